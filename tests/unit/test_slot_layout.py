"""Slot bookkeeping of the sink cache, model-free."""

from __future__ import annotations

import pytest
import torch

from tests.cache_probes import slot_order
from worker.exceptions import CacheCapacityError
from worker.model.slot_layout import SlotLayout


def _feed(layout: SlotLayout, sizes: list[int]) -> list[int]:
    """Feed chunks; return the stream index held by each slot, like the cache would."""
    owner = [-1] * layout.capacity
    seen = 0
    for size in sizes:
        plan = layout.plan(size)
        for i, slot in enumerate(plan.new_slots.tolist()):
            owner[slot] = seen + i
        layout.commit(plan)
        seen += size
    return owner


def _expected_kept(total: int, capacity: int, head: int, sizes: list[int]) -> list[int]:
    """Kept stream indices, by plain list operations."""
    kept: list[int] = []
    seen = 0
    for size in sizes:
        if len(kept) + size > capacity:
            recent = capacity - head - size
            kept = kept[:head] + kept[len(kept) - recent :]
        kept += list(range(seen, seen + size))
        seen += size
    return kept


@pytest.mark.parametrize("sizes", [[1] * 100, [3, 1, 7, 2, 5] * 9, [10] * 12, [16, 1, 16]])
def test_kept_tokens_are_head_plus_most_recent_in_position_order(sizes: list[int]) -> None:
    layout = SlotLayout(capacity=20, sinks=4)
    owner = _feed(layout, sizes)
    kept = [owner[s] for s in slot_order(layout).tolist()]
    assert kept == _expected_kept(sum(sizes), 20, 4, sizes)
    assert layout.length == min(sum(sizes), 20)
    assert layout.tokens_seen == sum(sizes)


def test_positions_stay_inside_the_cache() -> None:
    layout = SlotLayout(capacity=8, sinks=2)
    for _ in range(1000):
        plan = layout.plan(3)
        assert plan.length_after <= 8
        layout.commit(plan)
    assert layout.evicted_total == 1000 * 3 - 8


def test_plan_without_commit_changes_nothing() -> None:
    layout = SlotLayout(capacity=8, sinks=2)
    _feed(layout, [8])
    before = layout.to_meta()
    layout.plan(3)
    assert layout.to_meta() == before


def test_eviction_is_deterministic_and_round_trips_through_meta() -> None:
    a, b = SlotLayout(16, 4), SlotLayout(16, 4)
    _feed(a, [5, 9, 3, 7])
    _feed(b, [5, 9, 3, 7])
    restored = SlotLayout.from_meta(a.to_meta())
    assert a.to_meta() == b.to_meta() == restored.to_meta()
    assert torch.equal(a.plan(2).new_slots, restored.plan(2).new_slots)


def test_contiguous_plan_uses_a_slice_until_the_ring_wraps() -> None:
    layout = SlotLayout(capacity=8, sinks=2)
    plan = layout.plan(5)
    assert plan.order == slice(0, 5)
    layout.commit(plan)
    layout.commit(layout.plan(3))
    assert not isinstance(layout.plan(1).order, slice)


def test_pinned_prefix_is_never_evicted() -> None:
    layout = SlotLayout(capacity=16, sinks=4)
    layout.commit(layout.plan(6))
    layout.pin(6)
    owner = _feed(layout, [1] * 50)
    kept = [owner[s] for s in slot_order(layout).tolist()]
    assert kept[:6] == [-1] * 6  # the instruction's slots were never reused
    assert layout.head == 6


@pytest.mark.parametrize(
    ("capacity", "sinks", "chunk", "message"),
    [(4, 4, 1, "room beyond its sinks"), (8, 2, 9, "does not fit a window"), (8, 2, 0, "chunk")],
)
def test_impossible_requests_are_refused(capacity, sinks, chunk, message) -> None:
    with pytest.raises(CacheCapacityError, match=message):
        SlotLayout(capacity, sinks).plan(chunk)


def test_pin_too_long_or_too_late_is_refused() -> None:
    layout = SlotLayout(capacity=16, sinks=4)
    with pytest.raises(CacheCapacityError, match="shorten the instruction"):
        layout.pin(12)
    _feed(layout, [1] * 20)
    with pytest.raises(CacheCapacityError, match="before the first eviction"):
        layout.pin(6)


@pytest.mark.parametrize("pin", [4, 7])
def test_a_span_of_the_stream_maps_to_the_slots_still_holding_it(pin: int) -> None:
    layout = SlotLayout(capacity=16, sinks=4)
    layout.pin(pin)
    sizes = [pin, 3, 5, 1, 1, 6, 2, 7, 1, 4]
    owner = _feed(layout, sizes)
    total = sum(sizes)
    held = set(owner)
    for start, end in [(0, 3), (pin, pin + 4), (total - 9, total - 2), (total - 3, total + 5)]:
        slots = layout.slots_of_span(start, end).tolist()
        assert [owner[slot] for slot in slots] == [t for t in range(start, end) if t in held]
    assert layout.slots_of_span(pin, pin + 3).tolist() == []  # evicted long ago
