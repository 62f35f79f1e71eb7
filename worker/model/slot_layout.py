"""Where each token of a sink cache lives, and which token to evict next.

The cache buffer has `capacity` slots. The first `head` slots hold the attention sinks (and a
pinned instruction, if longer) forever; the remaining slots form a ring holding the most recent
tokens. Keeping the window as a ring means eviction moves no memory: it only advances
`ring_start`. Positions are assigned inside the cache: the head at 0..head-1, then the window
tokens oldest first, so a position never exceeds `capacity - 1` however long the stream runs.

This module is pure bookkeeping (no model, no tensors of keys), so it is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import torch

from worker.exceptions import CacheCapacityError

P = TypeVar("P", int, torch.Tensor)


@dataclass(frozen=True)
class StepPlan:
    """What one forward of `new_tokens` tokens does to the cache, decided before the forward.

    Its tensors of slots (`new_slots`, `order`, `slot_positions`) are made on `device` when
    first asked for: a batched decode step makes a plan per row per token, and needs only each
    row's new slot, as an int.
    """

    evicted: int
    length_before: int  # tokens in the cache the new ones attend to (after eviction)
    head: int  # positions (and slots) 0..head-1 hold the head, never evicted
    shift: int  # tokens evicted once room is made: a window token's stream minus cache position
    ring_start: int  # the window's oldest slot, counted from the head, once room is made
    ring_size: int
    length_after: int  # length_before plus the new tokens
    device: torch.device | str

    @property
    def new_tokens(self) -> int:
        return self.length_after - self.length_before

    @property
    def full_ring(self) -> bool:
        """Every slot is live and out of position order (the steady state of a long stream)."""
        return self.ring_start != 0 and self.length_after > self.head

    @property
    def new_slot_list(self) -> list[int]:
        """The slot of each new token, in order."""
        head, start, size = self.head, self.ring_start, self.ring_size
        return [
            position if position < head else _ring_slot(position, head, start, size)
            for position in range(self.length_before, self.length_after)
        ]

    @cached_property
    def new_slots(self) -> torch.Tensor:
        """The slot of each new token, in order."""
        return torch.tensor(self.new_slot_list, dtype=torch.long, device=self.device)

    @cached_property
    def order(self) -> torch.Tensor | slice:
        """Slots of positions 0..length_after-1 (a slice where each is its own slot)."""
        if not self.full_ring:
            return slice(0, self.length_after)
        positions = torch.arange(self.length_after, device=self.device)
        in_ring = _ring_slot(positions, self.head, self.ring_start, self.ring_size)
        return torch.where(positions < self.head, positions, in_ring)

    @cached_property
    def slot_positions(self) -> torch.Tensor | None:
        """The position of every slot, where every slot is live and out of order; else None.
        (Out of order only once the ring has turned, and the cache is then full: each slot
        holds exactly one position.)"""
        if not self.full_ring:
            return None
        positions = torch.arange(self.length_after, device=self.device)
        return torch.empty_like(positions).index_copy_(0, self.order, positions)


class SlotLayout:
    """Deterministic slot assignment and eviction for one stream's cache (shared by all layers)."""

    def __init__(self, capacity: int, sinks: int) -> None:
        if sinks < 0 or capacity <= sinks:
            raise CacheCapacityError(
                f"the cache needs room beyond its sinks: capacity {capacity} <= sinks {sinks}; "
                "raise --window or lower --sinks"
            )
        self.capacity = capacity
        self.sinks = sinks
        self.head = sinks
        self.length = 0
        self.ring_start = 0
        self.tokens_seen = 0
        self.evicted_total = 0

    @property
    def ring_size(self) -> int:
        return self.capacity - self.head

    def pin(self, prefix_tokens: int) -> None:
        """Never evict the first `prefix_tokens` (an instruction), like llama.cpp's --keep."""
        head = max(self.sinks, prefix_tokens)
        if head == self.head:
            return
        if self.evicted_total:
            raise CacheCapacityError("a prefix can only be pinned before the first eviction")
        if head > self.capacity // 2:
            raise CacheCapacityError(
                f"the pinned prefix of {prefix_tokens} tokens leaves too little window in a cache "
                f"of {self.capacity}; shorten the instruction or raise --window"
            )
        self.head = head

    def plan(self, new_tokens: int, device: torch.device | str = "cpu") -> StepPlan:
        """Make room for `new_tokens` (evicting the oldest window tokens) and place them."""
        room = self.capacity - min(self.length, self.head)
        if not 0 < new_tokens <= room:
            raise CacheCapacityError(
                f"a chunk of {new_tokens} tokens does not fit a window of {room}; "
                "split the input into smaller chunks or raise --window"
            )
        evicted = max(self.length + new_tokens - self.capacity, 0)
        ring_start = (self.ring_start + evicted) % self.ring_size if evicted else self.ring_start
        length_before = self.length - evicted
        return StepPlan(
            evicted,
            length_before,
            self.head,
            self.evicted_total + evicted,
            ring_start,
            self.ring_size,
            length_before + new_tokens,
            device,
        )

    def commit(self, plan: StepPlan) -> None:
        """Record a plan once its forward has succeeded."""
        if plan.evicted:
            self.ring_start = (self.ring_start + plan.evicted) % self.ring_size
            self.evicted_total += plan.evicted
        self.tokens_seen += plan.new_tokens
        self.length = plan.length_after

    def slot_runs(self, first_position: int, count: int) -> list[tuple[int, int]]:
        """Slots of positions first_position.. (count of them) in the current layout, as
        (start, stop) runs: host arithmetic, no device sync."""
        stop = first_position + count
        runs = [(first_position, min(stop, self.head))] if first_position < self.head else []
        first_ring = max(first_position, self.head)
        if first_ring < stop:
            start = self.head + (self.ring_start + first_ring - self.head) % self.ring_size
            end = start + stop - first_ring
            runs.append((start, min(end, self.capacity)))
            if end > self.capacity:
                runs.append((self.head, self.head + end - self.capacity))
        return runs

    def slots_of_span(self, start: int, end: int) -> torch.Tensor:
        """Slots of the stream's tokens start..end-1 (counted from its first token) that are
        still in the cache, oldest first; the evicted ones are left out."""
        oldest = self.head + self.evicted_total  # the oldest window token still held
        slots = [
            t if t < self.head else self.head + (t - self.head) % self.ring_size
            for t in range(max(start, 0), min(end, self.tokens_seen))
            if t < self.head or t >= oldest
        ]
        return torch.tensor(slots, dtype=torch.long)

    def stream_positions(self) -> torch.Tensor:
        """[capacity]: the stream position of the token in each slot (of the live ones)."""
        slots = torch.arange(self.capacity)
        in_ring = (slots - self.head - self.ring_start) % self.ring_size + self.head
        return torch.where(slots < self.head, slots, in_ring + self.evicted_total)

    def to_meta(self) -> dict[str, int]:
        return {
            "capacity": self.capacity,
            "sinks": self.sinks,
            "head": self.head,
            "length": self.length,
            "ring_start": self.ring_start,
            "tokens_seen": self.tokens_seen,
            "evicted_total": self.evicted_total,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, int]) -> SlotLayout:
        """The layout `to_meta` gave; ValueError if the values cannot be one (a damaged state)."""
        if any(type(meta[name]) is not int for name in cls._SAVED):
            raise ValueError(f"a saved layout holds a value that is not an int: {meta}")
        layout = cls(meta["capacity"], meta["sinks"])
        for name in cls._SAVED[2:]:
            setattr(layout, name, meta[name])
        if not (
            layout.sinks <= layout.head < layout.capacity
            and 0 <= layout.length <= layout.capacity
            and 0 <= layout.ring_start < layout.ring_size
            and 0 <= layout.evicted_total <= layout.tokens_seen - layout.length
        ):
            raise ValueError(f"a saved layout is inconsistent: {meta}")
        return layout

    _SAVED = ("capacity", "sinks", "head", "length", "ring_start", "tokens_seen", "evicted_total")


def _ring_slot(position: P, head: int, ring_start: int, ring_size: int) -> P:
    """The slot of a window position (an int, or a tensor of them), the ring starting at
    `ring_start`."""
    return head + (ring_start + position - head) % ring_size
