"""A sink cache snapshots its tensors in pieces and loads them back, on tiny tensors, no model.

Incremental snapshots are checked against the cache itself: after any sequence of writes,
saved and unsaved snapshots, what the last saved snapshot's pieces (carried or named) lay down
is the cache as it was.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tests.models.reference import _unrotate
from worker.model.cache_snapshot import CacheSnapshot
from worker.model.layer_kinds import uniform
from worker.model.positions import RotaryScheme
from worker.model.sink_cache import SinkCache
from worker.model.snapshot_pieces import CELL_SLOTS, Piece

HEADS, DIM, LAYERS, SINKS = 2, 8, 2, 4
CAPACITY = 2 * CELL_SLOTS + 12  # a last cell shorter than the others


ROTARY = LlamaRotaryEmbedding(LlamaConfig(hidden_size=HEADS * DIM, num_attention_heads=HEADS))


def _cache(capacity: int = CAPACITY) -> SinkCache:
    return SinkCache(uniform(RotaryScheme(ROTARY), LAYERS), capacity=capacity, sinks=SINKS)


def _position_free(cache: SinkCache, keys: torch.Tensor) -> torch.Tensor:
    """A layer's stored keys as states saved them before keys were kept at stream positions:
    un-rotated with the model's own cos and sin at each slot's stream position."""
    positions = cache.layout.stream_positions()
    cos, sin = ROTARY(keys, positions[None])
    return _unrotate(keys, cos[0][None, None], sin[0][None, None])


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


def _saved(cache: SinkCache, store: dict[str, torch.Tensor]) -> CacheSnapshot:
    """A snapshot committed to `store` (name -> tensor, as a store keeps blocks by name)."""
    snapshot = cache.snapshot()
    assert all(name in store for name in snapshot.kept)
    store.update(snapshot.tensors)
    cache.saved(snapshot)
    return snapshot


def _restored(snapshot: CacheSnapshot, store: dict[str, torch.Tensor]) -> SinkCache:
    names = [*snapshot.tensors, *snapshot.kept]
    loaded = _cache()
    loaded.load({name: store[name] for name in names}, snapshot.meta)
    return loaded


def _carried_slots(snapshot: CacheSnapshot) -> int:
    pieces = [Piece.parse(name) for name in snapshot.tensors if name != "token_ids"]
    return sum(piece.stop - piece.start for piece in pieces)


def _assert_same(a: SinkCache, b: SinkCache) -> None:
    assert a.layout.to_meta() == b.layout.to_meta()
    assert torch.equal(a.token_ids, b.token_ids)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        assert y.is_initialized and y.get_seq_length() == x.get_seq_length()


def test_a_first_snapshot_carries_every_cell_and_the_meta() -> None:
    cache = _cache()
    _run(cache, 0, 200)
    snapshot = cache.snapshot()
    cells = [Piece(cache.pieces.generation, s, min(s + CELL_SLOTS, CAPACITY)) for s in (0, 64, 128)]
    assert list(snapshot.tensors) == ["token_ids"] + [piece.name for piece in cells]
    assert snapshot.kept == ()
    assert snapshot.tensors[cells[2].name].shape == (LAYERS, 2, 1, HEADS, 12, DIM)
    assert snapshot.meta == {"layout": cache.layout.to_meta(), "layers": LAYERS, "keys": "stream"}


def test_the_next_snapshot_carries_only_the_slots_written_since() -> None:
    cache, store = _cache(), {}
    _run(cache, 0, 200)
    first = _saved(cache, store)
    _run(cache, 200, 5, chunk=5)  # 5 tokens into a full ring: 5 slots, maybe across cells
    following = cache.snapshot()
    assert _carried_slots(following) == 5
    assert set(following.kept) <= set(first.tensors)
    loaded = _restored(following, {**store, **following.tensors})
    _assert_same(cache, loaded)


@pytest.mark.parametrize("seed", range(6))
def test_many_incremental_snapshots_across_ring_turns_restore_exactly(seed: int) -> None:
    """Random chunks and random failed commits (snapshots never saved), ring turned often."""
    generator = torch.Generator().manual_seed(seed)
    cache, store = _cache(), {}
    fed, last = 0, None
    while fed < 6 * CAPACITY:
        count = int(torch.randint(1, 40, (1,), generator=generator))
        _run(cache, fed, count, chunk=int(torch.randint(1, 17, (1,), generator=generator)))
        fed += count
        if torch.rand(1, generator=generator) < 0.3:
            cache.snapshot()  # a commit that failed: nothing is marked saved
        else:
            last = _saved(cache, store)
            _assert_same(cache, _restored(last, store))
    assert sum(name.startswith("kv.") for name in [*last.tensors, *last.kept]) <= 8 * 3


def test_a_snapshot_right_after_a_load_carries_only_what_changed() -> None:
    cache, store = _cache(), {}
    _run(cache, 0, 300)
    loaded = _restored(_saved(cache, store), store)
    assert loaded.snapshot().tensors.keys() == {"token_ids"}
    _run(loaded, 300, 3, chunk=3)
    _run(cache, 300, 3, chunk=3)
    snapshot = _saved(loaded, store)
    assert _carried_slots(snapshot) == 3
    _assert_same(cache, _restored(snapshot, store))


def _assert_turned_alike(a: SinkCache, b: SinkCache) -> None:
    """`b` loaded from `a`'s keys saved position-free: the same but for the turns' rounding."""
    assert a.layout.to_meta() == b.layout.to_meta() and torch.equal(a.token_ids, b.token_ids)
    for x, y in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(y.keys, x.keys, rtol=0, atol=1e-5)
        assert torch.equal(x.values, y.values)


def test_a_state_saved_in_64_slot_blocks_per_layer_still_loads() -> None:
    """The format before pieces: 'layer{i}.keys.{block}', keys position-free; the next
    snapshot carries it all."""
    cache = _cache()
    _run(cache, 0, 200)
    tensors = {"token_ids": cache.token_ids.clone()}
    for index, layer in enumerate(cache.layers):
        free = _position_free(cache, layer.keys)
        for kind, buffer in (("keys", free), ("values", layer.values)):
            for block, start in enumerate(range(0, CAPACITY, 64)):
                tensors[f"layer{index}.{kind}.{block}"] = buffer[:, :, start : start + 64].clone()
    loaded = _cache()
    loaded.load(tensors, {"layout": cache.layout.to_meta(), "layers": LAYERS})
    _assert_turned_alike(cache, loaded)
    assert len(loaded.snapshot().tensors) == 1 + 3


def test_a_state_whose_keys_were_saved_position_free_loads_turned_and_is_saved_anew() -> None:
    cache, store = _cache(), {}
    _run(cache, 0, 500)  # the ring turned: stream positions run far past the cache's
    snapshot = _saved(cache, store)
    older = {name: tensor.clone() for name, tensor in snapshot.tensors.items()}
    for name, piece in older.items():
        if name != "token_ids":
            start, stop = Piece.parse(name).start, Piece.parse(name).stop
            for layer in piece:
                every_slot = torch.zeros(1, HEADS, CAPACITY, DIM)
                every_slot[:, :, start:stop] = layer[0]
                layer[0].copy_(_position_free(cache, every_slot)[:, :, start:stop])
    meta = {key: value for key, value in snapshot.meta.items() if key != "keys"}
    loaded = _cache()
    loaded.load(older, meta)
    _assert_turned_alike(cache, loaded)
    assert _carried_slots(loaded.snapshot()) == CAPACITY  # its blocks hold the old keys


def test_loaded_cache_continues_alike() -> None:
    cache, store = _cache(), {}
    _run(cache, 0, 200)
    snapshot = _saved(cache, store)
    loaded = _cache()
    loaded.load(snapshot.tensors, {**snapshot.meta, "counters": {}})  # session keys ignored
    _assert_same(cache, loaded)
    for a, b in zip(_run(cache, 200, 30), _run(loaded, 200, 30), strict=True):
        assert torch.equal(a, b)


def test_snapshot_tensors_do_not_change_when_the_cache_goes_on() -> None:
    cache = _cache()
    _run(cache, 0, 60)
    tensors = cache.snapshot().tensors
    before = {name: tensor.clone() for name, tensor in tensors.items()}
    _run(cache, 60, 40)
    assert all(torch.equal(tensors[name], before[name]) for name in before)


def test_a_cache_of_another_size_or_with_slots_missing_is_refused() -> None:
    cache = _cache()
    _run(cache, 0, 20)
    snapshot = cache.snapshot()
    with pytest.raises(ValueError, match="use the same sizes"):
        _cache(CAPACITY + 1).load(snapshot.tensors, snapshot.meta)
    partial = {name: t for name, t in snapshot.tensors.items() if not name.endswith(".0.64")}
    with pytest.raises(ValueError, match="incomplete"):
        _cache().load(partial, snapshot.meta)
