"""The Llama family's lean decode forward gives every row transformers' bits, its layers one
call at a time or all in one (decode_layers.py)."""

from __future__ import annotations

import pytest
import torch

from tests.models.tiny_models import VOCAB, tiny_model
from worker.model import cpu_kernels, decode_forward, decode_layers
from worker.model.batch_cache import batch_forward
from worker.model.batch_invariance import make_batch_invariant
from worker.model.decoder import forward_step
from worker.model.kv_pool import KVPool
from worker.model.sink_cache import SinkCache

CAPACITY, SINKS, CHUNK = 24, 4, 8
PROMPTS = (5, 19, 23, 41)  # short, about to fill, full, long turned


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def _streams(model: torch.nn.Module, pools: int = 1) -> list[SinkCache]:
    """A cache per prompt, prefilled, in `pools` pools taken in turn."""
    shared = [KVPool(model.config.num_hidden_layers) for _ in range(pools)]
    caches = [
        SinkCache.for_model(model, CAPACITY, SINKS, shared[i % pools]) for i in range(len(PROMPTS))
    ]
    for seed, (length, cache) in enumerate(zip(PROMPTS, caches, strict=True)):
        for piece in _ids(length, seed).split(CHUNK):
            forward_step(model, cache, piece)
    return caches


WHOLE_PANELS = {"hidden_size": 96, "intermediate_size": 96, "head_dim": 24}  # 96 and 48 outputs


def _spy_on_layers(monkeypatch, one_call: bool) -> list[int]:
    """The runs of each step whose layers ran in one call; none run so unless `one_call`."""
    calls = []
    original = decode_layers.run
    monkeypatch.setattr(
        decode_layers, "run", lambda *a: calls.append(len(a[1].runs)) or original(*a)
    )
    if not one_call:
        monkeypatch.setattr(decode_layers, "stack_for", lambda *a: None)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("one_call", [False, True])
@pytest.mark.parametrize("name", ["llama", "llama-yarn", "llama3-scaled", "mistral", "qwen2"])
@torch.inference_mode()
def test_rows_get_the_bits_of_transformers_forward(
    name: str, one_call: bool, fused: bool, dtype: torch.dtype, monkeypatch
) -> None:
    """With projections of whole panels, the layer's query, key and value run as one call,
    its gate and up as another, and the layers all in one call unless told not to; the rotary
    is one call in either dtype."""
    model = tiny_model(name, **(WHOLE_PANELS if fused else {})).to(dtype)
    make_batch_invariant(model)  # packed anew for the dtype, as a loaded model is
    layer = model.base_model.layers[0]
    groups = [
        getattr(layer.self_attn, "streamsink_qkv", None),
        getattr(layer.mlp, "streamsink_gate_up", None),
    ]
    assert all(group is not None and group.current for group in groups) == fused
    lean, stock = _streams(model), _streams(model)
    runs = []
    original = decode_forward.forward
    monkeypatch.setattr(decode_forward, "forward", lambda *a: runs.append(1) or original(*a))
    in_one_call = _spy_on_layers(monkeypatch, one_call)
    _decode_side_by_side(model, lean, stock, (decode_forward, "takes", False), monkeypatch)
    assert len(runs) == 10  # the lean forward ran each step, transformers' the others
    one_call_runs = one_call and fused and cpu_kernels.status().ready
    assert in_one_call == ([1] * 10 if one_call_runs else [])


def _decode_side_by_side(
    model: torch.nn.Module,
    caches: list[SinkCache],
    others: list[SinkCache],
    patch: tuple[object, str, object],
    monkeypatch,
) -> None:
    """Ten greedy steps of `caches` as they run and of `others` with `patch` (a module, an
    attribute and what each call of it returns) set: the same logits each step, and the same
    caches after."""
    module, attribute, returns = patch
    tokens = _ids(len(PROMPTS), 99)
    for _ in range(10):
        ours = batch_forward(model, caches, tokens)
        with monkeypatch.context() as patched:
            patched.setattr(module, attribute, lambda *a: returns)
            theirs = batch_forward(model, others, tokens)
        assert torch.equal(ours, theirs)
        tokens = ours.argmax(-1)
    for mine, other in zip(caches, others, strict=True):
        assert mine.layout.to_meta() == other.layout.to_meta()
        assert torch.equal(mine.layers[-1].keys, other.layers[-1].keys)
        assert torch.equal(mine.layers[-1].values, other.layers[-1].values)


@pytest.mark.skipif(not cpu_kernels.status().ready, reason="the CPU kernels are not built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_rows_of_several_runs_get_the_same_bits_in_one_call(
    dtype: torch.dtype, monkeypatch
) -> None:
    """Caches of two pools are two runs: the one call slices each run's rows as the loop does."""
    model = tiny_model("qwen2", **WHOLE_PANELS).to(dtype)  # with the projections' biases
    make_batch_invariant(model)
    one, loop = _streams(model, pools=2), _streams(model, pools=2)
    in_one_call = _spy_on_layers(monkeypatch, one_call=True)
    _decode_side_by_side(model, one, loop, (decode_layers, "stack_for", None), monkeypatch)
    assert in_one_call == [2] * 10


@torch.inference_mode()
def test_a_model_the_one_call_cannot_run_keeps_the_loop() -> None:
    """Another activation, projections not fused, or a model moved to another dtype since its
    weights were packed: no stack. Packed anew, the model has one again."""
    assert decode_layers.stack_of(tiny_model("llama")) is None  # not whole panels
    assert decode_layers.stack_of(tiny_model("llama", **WHOLE_PANELS, hidden_act="gelu")) is None
    model = tiny_model("llama", **WHOLE_PANELS)
    ready = cpu_kernels.status().ready
    assert (decode_layers.stack_of(model) is not None) == ready
    model.to(torch.bfloat16)
    assert decode_layers.stack_of(model) is None
    make_batch_invariant(model)
    stack = decode_layers.stack_of(model)
    assert (stack is not None and stack.weights[0].dtype == torch.bfloat16) == ready


@pytest.mark.parametrize("name", ["qwen3", "gemma", "phi3-partial", "gemma3-hybrid"])
@torch.inference_mode()
def test_other_layers_and_sliding_ones_run_transformers_forward(name: str, monkeypatch) -> None:
    """Qwen3's query and key norms, Gemma's scaled embeddings and Phi-3's fused projections
    are not Llama's layer; a hybrid model takes a mask per layer type."""
    model = tiny_model(name)
    caches = _streams(model)
    monkeypatch.setattr(decode_forward, "forward", lambda *a: pytest.fail("the lean forward ran"))
    assert batch_forward(model, caches, _ids(len(PROMPTS), 98)).isfinite().all()
