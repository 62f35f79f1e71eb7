"""The pool of key and value buffers that sink caches share, a slot each, with no model."""

from __future__ import annotations

import gc

import pytest
import torch

from worker.model.kv_pool import KVPool


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
