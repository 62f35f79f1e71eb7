"""Buffers many sink caches share: per layer, one for keys and one for values, [slots, heads,
capacity, dims], a slot per cache.

A batched decode step's attention reads the rows of adjacent slots in place, as one view,
instead of copying every row's cache into a batch (batch_cache.py), and a cache takes its slot
and gives it back without moving any other. A slot is given back when its cache is collected,
so the pool never holds on to a dropped stream. The buffers are made at a layer's first write,
when its shape is known, and grow by doubling (a copy of what they hold: rare, and never
during a forward's read of them).

A freed slot keeps what its last cache wrote; a new cache's unfilled slots are masked, so
their contents (finite values, or zeros) never reach a score.
"""

from __future__ import annotations

import heapq
import weakref

import torch


class KVPool:
    """The key and value buffers of every layer, shared by the caches that take a slot."""

    def __init__(self, layers: int) -> None:
        self._keys: list[torch.Tensor | None] = [None] * layers
        self._values: list[torch.Tensor | None] = [None] * layers
        self._slots = 1  # rows each buffer has room for
        self._free: list[int] = []  # given back, lowest first
        self._taken = 0  # slots ever handed out (the next new one)

    def take(self, owner: object) -> int:
        """A slot for `owner`, given back once `owner` is collected."""
        slot = heapq.heappop(self._free) if self._free else self._next_slot()
        weakref.finalize(owner, heapq.heappush, self._free, slot)
        return slot

    def _next_slot(self) -> int:
        slot, self._taken = self._taken, self._taken + 1
        if slot >= self._slots:
            self._grow(2 * self._slots)
        return slot

    def _grow(self, slots: int) -> None:
        for buffers in (self._keys, self._values):
            for index, old in enumerate(buffers):
                if old is not None:
                    buffers[index] = torch.cat(
                        (old, old.new_zeros(slots - len(old), *old.shape[1:]))
                    )
        self._slots = slots

    def made(self, layer: int) -> bool:
        return self._keys[layer] is not None

    def make(self, layer: int, keys: torch.Size, values: torch.Size, like: torch.Tensor) -> None:
        """Buffers for `layer`, whose one slot of keys and of values is shaped [heads,
        capacity, dims], in `like`'s dtype and device."""
        self._keys[layer] = like.new_zeros(self._slots, *keys)
        self._values[layer] = like.new_zeros(self._slots, *values)

    def keys(self, layer: int) -> torch.Tensor:
        """[slots, heads, capacity, dims] (a view of it is valid until the pool grows)."""
        return self._keys[layer]

    def values(self, layer: int) -> torch.Tensor:
        return self._values[layer]
