"""Which stream caches stay in memory: a budget of live caches, least recently used out first.

A worker may see thousands of streams but keeps at most `limit` caches; the others wait in the
state store, whose restore is cheap. This is bookkeeping only (no sessions, no store): it
says how much of a batch fits now and which caches must go first to make room. Only a cache
whose state is saved may go (the caller says which are), so dropping one never loses input.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class Admission(Generic[Key]):
    """The first `count` arriving records fit once the caches of `drop` are gone."""

    count: int
    drop: list[Key]


class LiveBudget(Generic[Key]):
    """The live caches in order of use; `limit` None means no budget."""

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"a budget of live streams must be 1 or more, not {limit}")
        self.limit = limit
        self._order: OrderedDict[Key, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def used(self, key: Key) -> None:
        """The cache of `key` is live and was just used (added if new)."""
        self._order[key] = None
        self._order.move_to_end(key)

    def dropped(self, key: Key) -> None:
        self._order.pop(key, None)

    def admit(self, arriving: Sequence[Key | None], saved: Callable[[Key], bool]) -> Admission:
        """How many of `arriving` (each record's cache key in order, None for a record that
        needs no cache) fit, and which saved caches go first: the longest prefix whose new
        caches fit once saved caches outside that prefix are dropped, least recently used
        first. A count of 0 means the caches that would have to go are not saved yet."""
        if self.limit is None:
            return Admission(len(arriving), [])
        droppable = [key for key in self._order if saved(key)]
        can_drop = set(droppable)
        spared: set[Key] = set()  # live caches the prefix uses
        new: set[Key] = set()  # caches the prefix opens
        kept = len(self._order) - len(can_drop)  # caches that stay whatever is dropped
        count = 0
        for key in arriving:
            if key is not None and key not in spared and key not in new:
                # A new cache takes room; so does a saved one the prefix uses (it may not go).
                if key not in self._order or key in can_drop:
                    if kept + 1 > self.limit:
                        break
                    kept += 1
                (spared if key in self._order else new).add(key)
            count += 1
        surplus = len(self._order) + len(new) - self.limit
        drop = [key for key in droppable if key not in spared][: max(surplus, 0)]
        return Admission(count, drop)
