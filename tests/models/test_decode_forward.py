"""The Llama family's lean decode forward gives every row transformers' bits."""

from __future__ import annotations

import pytest
import torch

from tests.models.tiny_models import VOCAB, tiny_model
from worker.model import decode_forward
from worker.model.batch_cache import batch_forward
from worker.model.batch_invariance import make_batch_invariant
from worker.model.decoder import forward_step
from worker.model.kv_pool import KVPool
from worker.model.sink_cache import SinkCache

CAPACITY, SINKS, CHUNK = 24, 4, 8
PROMPTS = (5, 19, 23, 41)  # short, about to fill, full, long turned


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def _streams(model: torch.nn.Module) -> list[SinkCache]:
    pool = KVPool(model.config.num_hidden_layers)
    caches = [SinkCache.for_model(model, CAPACITY, SINKS, pool) for _ in PROMPTS]
    for seed, (length, cache) in enumerate(zip(PROMPTS, caches, strict=True)):
        for piece in _ids(length, seed).split(CHUNK):
            forward_step(model, cache, piece)
    return caches


WHOLE_PANELS = {"hidden_size": 96, "intermediate_size": 96, "head_dim": 24}  # 96 and 48 outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["llama", "llama-yarn", "llama3-scaled", "mistral", "qwen2"])
@torch.inference_mode()
def test_rows_get_the_bits_of_transformers_forward(
    name: str, fused: bool, dtype: torch.dtype, monkeypatch
) -> None:
    """With projections of whole panels, the layer's query, key and value run as one call,
    its gate and up as another; its rotary is one call in either dtype."""
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
    tokens = _ids(len(PROMPTS), 99)
    for _ in range(10):
        ours = batch_forward(model, lean, tokens)
        with monkeypatch.context() as patched:
            patched.setattr(decode_forward, "takes", lambda *a: False)
            theirs = batch_forward(model, stock, tokens)
        assert torch.equal(ours, theirs)
        tokens = ours.argmax(-1)
    assert len(runs) == 10  # the lean forward ran each step, transformers' the others
    for mine, other in zip(lean, stock, strict=True):
        assert mine.layout.to_meta() == other.layout.to_meta()
        assert torch.equal(mine.layers[-1].keys, other.layers[-1].keys)
        assert torch.equal(mine.layers[-1].values, other.layers[-1].values)


@pytest.mark.parametrize("name", ["qwen3", "gemma", "phi3-partial", "gemma3-hybrid"])
@torch.inference_mode()
def test_other_layers_and_sliding_ones_run_transformers_forward(name: str, monkeypatch) -> None:
    """Qwen3's query and key norms, Gemma's scaled embeddings and Phi-3's fused projections
    are not Llama's layer; a hybrid model takes a mask per layer type."""
    model = tiny_model(name)
    caches = _streams(model)
    monkeypatch.setattr(decode_forward, "forward", lambda *a: pytest.fail("the lean forward ran"))
    assert batch_forward(model, caches, _ids(len(PROMPTS), 98)).isfinite().all()
