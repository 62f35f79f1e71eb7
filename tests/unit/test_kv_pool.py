"""The pool of key and value buffers that sink caches share, a slot each, with no model."""

from __future__ import annotations

import gc

import pytest
import torch

from worker.model.kv_pool import KVPool, decoder_pool


class Owner:
    """Stands for a cache: its slot is given back once it is collected."""


def test_slots_are_the_lowest_free_and_come_back_when_their_owner_goes() -> None:
    pool = KVPool(layers=2)
    owners = [Owner() for _ in range(3)]
    assert [pool.take(owner) for owner in owners] == [0, 1, 2]
    del owners[1]
    gc.collect()
    keep = Owner()
    assert pool.take(keep) == 1
    assert pool.take(keep) == 3  # none free below


def test_the_pool_grows_a_chunk_at_a_time_and_keeps_what_it_holds() -> None:
    pool = KVPool(layers=1)
    owners = [Owner()]
    pool.take(owners[0])
    pool.make(0, (2, 8, 4), (2, 8, 4), torch.empty(0))
    pool.keys(0, 0).fill_(7.0)
    owners += [Owner() for _ in range(pool.chunk_slots)]
    slots = [pool.take(owner) for owner in owners[1:]]
    assert slots == list(range(1, pool.chunk_slots + 1))  # the last one opened a second chunk
    assert torch.equal(pool.keys(0, 0), torch.full((1, 2, 8, 4), 7.0))
    assert pool.values(0, 1, pool.chunk_slots - 1).abs().sum() == 0
    assert pool.keys(0, pool.chunk_slots).shape == (1, 2, 8, 4)
    with pytest.raises(ValueError, match="more than one chunk"):
        pool.keys(0, pool.chunk_slots - 1, 2)


def test_a_slot_is_zeroed_when_first_handed_out_whatever_its_buffer_held() -> None:
    pool = KVPool(layers=2)
    first = Owner()
    pool.take(first)
    for layer in range(2):
        pool.make(layer, (2, 8, 4), (2, 8, 4), torch.empty(0))
        assert pool.keys(layer, 0).abs().sum() == 0  # taken before its layer was made
        # what an empty buffer may hold
        pool.keys(layer, 1, pool.chunk_slots - 1).fill_(float("nan"))
        pool.values(layer, 1, pool.chunk_slots - 1).fill_(float("nan"))
    second = Owner()
    assert pool.take(second) == 1
    for layer in range(2):
        assert pool.keys(layer, 1).abs().sum() == 0
        assert pool.values(layer, 1).abs().sum() == 0
        assert pool.keys(layer, 2).isnan().all()  # not handed out: not touched


def test_a_pool_of_one_slot_a_chunk_gives_each_slot_buffers_of_its_own() -> None:
    """A cache alone (its own pool) takes one slot's memory, not a chunk's."""
    pool = KVPool(layers=1, chunk_slots=1)
    owners = [Owner(), Owner()]
    assert [pool.take(owner) for owner in owners] == [0, 1]
    pool.make(0, (2, 8, 4), (2, 8, 4), torch.empty(0))
    assert pool.keys(0, 1).shape == (1, 2, 8, 4)
    with pytest.raises(ValueError, match="more than one chunk"):
        pool.keys(0, 0, 2)


def test_a_chunk_holds_the_slots_its_bytes_allow_counted_when_the_first_layer_is_made() -> None:
    """A GPU decoder's pool: the slots taken before then move to the chunks they count in."""
    slot_bytes = 2 * 2 * (2 * 8 * 4) * 4  # two layers of keys and values [2, 8, 4], float32
    pool = KVPool(layers=2, chunk_bytes=5 * slot_bytes + slot_bytes // 2)
    owners = [Owner() for _ in range(11)]
    assert [pool.take(owner) for owner in owners[:7]] == list(range(7))
    for layer in range(2):
        pool.make(layer, (2, 8, 4), (2, 8, 4), torch.empty(0))
    assert pool.chunk_slots == 5
    assert pool.same_chunk(5, 6) and not pool.same_chunk(4, 5)
    assert pool.keys(1, 6).shape == (1, 2, 8, 4) and pool.values(1, 6).abs().sum() == 0
    assert [pool.take(owner) for owner in owners[7:]] == [7, 8, 9, 10]  # 10 opened a third
    assert pool.keys(0, 10).abs().sum() == 0
    with pytest.raises(ValueError, match="more than one chunk"):
        pool.keys(0, 3, 3)
    tight = KVPool(layers=1, chunk_bytes=1)
    tight.make(0, (2, 8, 4), (2, 8, 4), torch.empty(0))
    assert tight.chunk_slots == 1  # one slot at least


def test_a_cpu_decoders_pool_keeps_chunks_of_32_whatever_their_size() -> None:
    pool = decoder_pool(1, torch.device("cpu"))
    pool.make(0, (2, 1024, 64), (2, 1024, 64), torch.empty(0))
    assert pool.chunk_slots == 32
