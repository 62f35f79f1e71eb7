"""A worker's lease on a partition in Redis: its epoch and what the last owner left."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cache_store.partition import OutboxEntry
from cache_store.redis.scoped import ScopedStates
from cache_store.state import Expected, StreamState
from cache_store.store import SaveReport


@dataclass(frozen=True)
class RedisLease:
    """A PartitionLease: every write carries the epoch, which the Lua scripts check."""

    states: ScopedStates
    scope: str
    epoch: int
    next_offset: int | None  # None: nothing was ever committed for this partition
    outbox: tuple[OutboxEntry, ...]

    def load(
        self, stream_id: str, expected_fingerprint: str | Expected | None = None
    ) -> StreamState | None:
        return self.states.load(self.scope, stream_id, expected_fingerprint)

    def commit(
        self,
        states: Sequence[StreamState],
        next_offset: int | None,
        outbox: Sequence[OutboxEntry] = (),
    ) -> SaveReport:
        return self.states.commit(self.scope, self.epoch, states, next_offset, outbox)

    def trim_outbox(self, delivered: int) -> None:
        self.states.trim_outbox(self.scope, self.epoch, delivered)
