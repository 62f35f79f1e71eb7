"""A sink cache exports its tensors in blocks and loads them back, on tiny tensors, no model."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from worker.model.layer_kinds import uniform
from worker.model.positions import RotaryScheme
from worker.model.sink_cache import BLOCK_SLOTS, SinkCache

HEADS, DIM, LAYERS, SINKS = 2, 8, 2, 4
CAPACITY = 2 * BLOCK_SLOTS + 12  # a last block shorter than the others


def _cache(capacity: int = CAPACITY) -> SinkCache:
    config = LlamaConfig(hidden_size=HEADS * DIM, num_attention_heads=HEADS)
    scheme = RotaryScheme(LlamaRotaryEmbedding(config), capacity)
    return SinkCache(uniform(scheme, LAYERS), capacity=capacity, sinks=SINKS)


def _run(cache: SinkCache, first: int, count: int, chunk: int = 7) -> list[torch.Tensor]:
    """Feed tokens first..first+count-1 with seeded random keys; the attention keys of each."""
    generator = torch.Generator().manual_seed(first)
    seen = []
    for start in range(first, first + count, chunk):
        ids = torch.arange(start, min(start + chunk, first + count))
        with cache.step(ids):
            for layer in cache.layers:
                keys = torch.randn(1, HEADS, len(ids), DIM, generator=generator)
                seen.append(layer.update(keys, keys + 1)[0])
    return seen


def test_export_names_blocks_and_meta_as_saved_states_do() -> None:
    cache = _cache()
    _run(cache, 0, 200)
    tensors, meta = cache.export()
    blocks = [f"{kind}.{b}" for kind in ("keys", "values") for b in range(3)]
    assert list(tensors) == ["token_ids"] + [f"layer{i}.{n}" for i in range(LAYERS) for n in blocks]
    assert tensors["layer1.values.2"].shape == (1, HEADS, CAPACITY - 2 * BLOCK_SLOTS, DIM)
    assert meta == {"layout": cache.layout.to_meta(), "layers": LAYERS}


def test_loaded_cache_equals_the_exported_one_and_continues_alike() -> None:
    cache = _cache()
    _run(cache, 0, 200)
    tensors, meta = cache.export()
    loaded = _cache()
    loaded.load(tensors, {**meta, "counters": {}})  # keys of a session's meta are ignored
    assert loaded.layout.to_meta() == cache.layout.to_meta()
    assert torch.equal(loaded.token_ids, cache.token_ids)
    for a, b in zip(cache.layers, loaded.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert b.is_initialized and b.get_seq_length() == a.get_seq_length()
    for a, b in zip(_run(cache, 200, 30), _run(loaded, 200, 30), strict=True):
        assert torch.equal(a, b)


def test_exported_blocks_do_not_change_when_the_cache_goes_on() -> None:
    cache = _cache()
    _run(cache, 0, 60)
    tensors, _ = cache.export()
    before = {name: tensor.clone() for name, tensor in tensors.items()}
    _run(cache, 60, 40)
    assert all(torch.equal(tensors[name], before[name]) for name in before)


def test_a_cache_of_another_size_or_with_blocks_missing_is_refused() -> None:
    cache = _cache()
    _run(cache, 0, 20)
    tensors, meta = cache.export()
    with pytest.raises(ValueError, match="use the same sizes"):
        _cache(CAPACITY + 1).load(tensors, meta)
    partial = {name: t for name, t in tensors.items() if not name.startswith("layer1.values")}
    with pytest.raises(ValueError, match="no values"):
        _cache().load(partial, meta)
