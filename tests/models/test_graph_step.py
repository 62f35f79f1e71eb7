"""The fixed-shape decode step (a GPU's, replayed from a CUDA graph): a stream's bits follow its
own cache alone, and on the CPU they are the batched step's.

Every test runs on the CPU, where the step runs without a graph; where torch sees a GPU they
run there too, with the graph (deploy/gpu_check.sh runs them on one).
"""

from __future__ import annotations

import pytest
import torch

from tests.models.tiny_models import VOCAB, tiny_model
from worker.model.batch_cache import batch_forward
from worker.model.decoder import forward_step
from worker.model.graph_step import GraphSteps, graph_steps
from worker.model.kv_pool import KVPool
from worker.model.sink_cache import SinkCache

CAPACITY, SINKS, CHUNK = 24, 4, 8
PROMPTS = (5, 19, 23, 41)  # short, about to fill, full, long turned
EVERY_STREAM = range(len(PROMPTS))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEPS = 12


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def _streams(model: torch.nn.Module, pool: KVPool, picks=EVERY_STREAM, fillers=0):
    """Caches of `pool`, stream i of `picks` prefilled with its prompt (PROMPTS[i] tokens),
    after `fillers` empty caches, which take the first slots (returned too, to keep them)."""
    held = [SinkCache.for_model(model, CAPACITY, SINKS, pool) for _ in range(fillers)]
    caches = []
    for pick in picks:
        cache = SinkCache.for_model(model, CAPACITY, SINKS, pool)
        for piece in _ids(PROMPTS[pick], pick).split(CHUNK):
            forward_step(model, cache, piece)
        caches.append(cache)
    return caches, held


def _greedy(step, caches: list[SinkCache], tokens: torch.Tensor) -> list[torch.Tensor]:
    """The logits of STEPS steps, each fed the greedy tokens of the last."""
    out = []
    for _ in range(STEPS):
        logits = step(caches, tokens)
        out.append(logits)
        tokens = logits.argmax(-1).cpu()
    return out


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt_neox-partial"])
@torch.inference_mode()
def test_on_the_cpu_the_fixed_shape_gives_the_bits_of_the_batched_step(name: str) -> None:
    model = tiny_model(name)
    fixed, batched = KVPool(model.config.num_hidden_layers), KVPool(model.config.num_hidden_layers)
    rows, _ = _streams(model, fixed)
    twins, _ = _streams(model, batched)
    tokens = _ids(len(PROMPTS), 99)
    graphs = GraphSteps(model, fixed)
    assert graphs.takes(rows)
    ours = _greedy(graphs.decode, rows, tokens)
    theirs = _greedy(lambda c, t: batch_forward(model, c, t), twins, tokens)
    for mine, other in zip(ours, theirs, strict=True):
        assert torch.equal(mine, other)
    for cache, twin in zip(rows, twins, strict=True):
        assert cache.layout.to_meta() == twin.layout.to_meta()
        assert all(
            torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            for a, b in zip(cache.layers, twin.layers, strict=True)
        )
    assert all(cache.layout.evicted_total for cache in rows[1:])


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_a_stream_gets_the_same_bits_alone_in_one_slot_or_with_company_in_another(
    device: str,
) -> None:
    model = tiny_model("llama", device=device)
    layers = model.config.num_hidden_layers
    alone, _ = _streams(model, KVPool(layers), picks=[2])
    crowd, held = _streams(model, KVPool(layers), fillers=5)
    assert (alone[0].slot, crowd[2].slot) == (0, 7)
    first = _ids(len(PROMPTS), 98)
    by_itself = _greedy(GraphSteps(model, alone[0].pool).decode, alone, first[2:3])
    together = _greedy(GraphSteps(model, crowd[0].pool).decode, crowd, first)
    for mine, ours in zip(by_itself, together, strict=True):
        assert torch.equal(mine[0], ours[2])


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_each_row_agrees_with_its_stream_alone_through_the_plain_forward(device: str) -> None:
    model = tiny_model("llama", device=device)
    rows, _ = _streams(model, KVPool(model.config.num_hidden_layers))
    plain = [SinkCache.for_model(model, CAPACITY, SINKS) for _ in PROMPTS]
    for seed, (length, cache) in enumerate(zip(PROMPTS, plain, strict=True)):
        for piece in _ids(length, seed).split(CHUNK):
            forward_step(model, cache, piece)
    graphs = GraphSteps(model, rows[0].pool)
    assert graphs.capture == (device == "cuda")
    assert (graph_steps(model, rows[0].pool) is not None) == (device == "cuda")
    tokens = _ids(len(PROMPTS), 97)
    for _ in range(STEPS):
        fixed = graphs.decode(rows, tokens)
        each = torch.stack(
            [forward_step(model, c, t[None])[-1] for c, t in zip(plain, tokens, strict=True)]
        )
        torch.testing.assert_close(fixed, each, rtol=1e-4, atol=1e-5)
        assert fixed.argmax(-1).tolist() == each.argmax(-1).tolist()
        tokens = each.argmax(-1).cpu()


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_rows_not_decoding_keep_their_caches_and_unused_slots_reach_no_row(device: str) -> None:
    """A stream that takes no token this step, and slots no cache ever took (NaN here), ride
    along in the chunk's forward: neither changes."""
    model = tiny_model("llama", device=device)
    layers = model.config.num_hidden_layers
    rows, _ = _streams(model, KVPool(layers))
    twins, _ = _streams(model, KVPool(layers))
    pool = rows[0].pool
    for layer in range(layers):  # past the four taken slots
        pool.keys(layer, 4, pool.chunk_slots - 4).fill_(float("nan"))
        pool.values(layer, 4, pool.chunk_slots - 4).fill_(float("nan"))
    idle = rows[1]
    before = [(layer.keys.clone(), layer.values.clone()) for layer in idle.layers]
    meta = idle.layout.to_meta()
    decoding = [rows[0], rows[2], rows[3]]
    tokens = _ids(3, 96)
    ours = _greedy(GraphSteps(model, pool).decode, decoding, tokens)
    alone = _greedy(GraphSteps(model, twins[0].pool).decode, [twins[0], twins[2], twins[3]], tokens)
    for mine, theirs in zip(ours, alone, strict=True):
        assert mine.isfinite().all() and torch.equal(mine, theirs)
    assert idle.layout.to_meta() == meta
    for (keys, values), layer in zip(before, idle.layers, strict=True):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


@torch.inference_mode()
def test_it_takes_caches_of_its_pool_only_and_no_sliding_layers() -> None:
    model = tiny_model("llama")
    rows, _ = _streams(model, KVPool(model.config.num_hidden_layers), picks=[0, 1])
    graphs = GraphSteps(model, rows[0].pool)
    assert graphs.takes(rows)
    loner, _ = _streams(model, KVPool(model.config.num_hidden_layers, chunk_slots=1), [0])
    assert not graphs.takes([rows[0], loner[0]])
    assert GraphSteps(model, loner[0].pool).takes(loner)  # a chunk of one row
    hybrid = tiny_model("gemma3-hybrid")
    sliding, _ = _streams(hybrid, KVPool(hybrid.config.num_hidden_layers), picks=[0])
    assert not GraphSteps(hybrid, sliding[0].pool).takes(sliding)
    assert graph_steps(model, rows[0].pool) is None  # on the CPU: the batched step


@torch.inference_mode()
def test_rows_in_several_chunks_come_back_in_the_order_given() -> None:
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    rows, _ = _streams(model, KVPool(layers, chunk_slots=2))  # slots 0-3: chunks 0 and 1
    twins, _ = _streams(model, KVPool(layers))
    order = [2, 0, 3, 1]
    tokens = _ids(len(order), 99)
    graphs = GraphSteps(model, rows[0].pool)
    ours = _greedy(graphs.decode, [rows[i] for i in order], tokens)
    theirs = _greedy(lambda c, t: batch_forward(model, c, t), [twins[i] for i in order], tokens)
    for mine, other in zip(ours, theirs, strict=True):
        assert torch.equal(mine, other)
    assert sorted(graphs._chunks) == [0, 1]
