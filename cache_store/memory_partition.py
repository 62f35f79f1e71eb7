"""Partitions in memory, with the epochs, fencing and outbox of the Redis implementation.

States go through the same codec as in Redis (each scope keeps a MemoryStore), so a test of
the checkpoint protocol against it restores exactly what a real worker would. Setting
`available` to False makes every call fail as an outage of the store would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cache_store.memory import MemoryStore
from cache_store.partition import FencedError, OutboxEntry, StoreUnavailableError
from cache_store.state import Expected, StreamState
from cache_store.store import SaveReport


@dataclass
class MemoryPartition:
    """What one scope holds: its current epoch, offset, outbox and states."""

    epoch: int = 0
    next_offset: int | None = None
    outbox: list[OutboxEntry] = field(default_factory=list)
    states: MemoryStore = field(default_factory=MemoryStore)


class MemoryPartitionStore:
    """A PartitionStore in dicts; see the module docstring."""

    def __init__(self) -> None:
        self.partitions: dict[str, MemoryPartition] = {}
        self.available = True

    def claim(self, scope: str) -> MemoryLease:
        self.check_available()
        partition = self.partitions.setdefault(scope, MemoryPartition())
        partition.epoch += 1
        return MemoryLease(
            self, scope, partition.epoch, partition.next_offset, tuple(partition.outbox)
        )

    def ping(self) -> None:
        self.check_available()

    def close(self) -> None:
        """Nothing to release."""

    def check_available(self) -> None:
        if not self.available:
            raise StoreUnavailableError("the in-memory store is switched off (available=False)")


@dataclass(frozen=True)
class MemoryLease:
    """A PartitionLease of MemoryPartitionStore."""

    store: MemoryPartitionStore
    scope: str
    epoch: int
    next_offset: int | None
    outbox: tuple[OutboxEntry, ...]

    def load(
        self, stream_id: str, expected_fingerprint: str | Expected | None = None
    ) -> StreamState | None:
        self.store.check_available()
        return self._partition().states.load(stream_id, expected_fingerprint)

    def commit(
        self,
        states: Sequence[StreamState],
        next_offset: int | None,
        outbox: Sequence[OutboxEntry] = (),
    ) -> SaveReport:
        started = time.perf_counter()
        partition = self._owned()
        for state in states:  # all or nothing: refuse before anything is saved
            partition.states.check_stored(state)
        reports = [partition.states.save(state) for state in states]
        if next_offset is not None:
            partition.next_offset = next_offset
        partition.outbox += outbox
        return SaveReport(
            bytes_written=sum(r.bytes_written for r in reports),
            blocks_written=sum(r.blocks_written for r in reports),
            blocks_reused=sum(r.blocks_reused for r in reports),
            seconds=time.perf_counter() - started,
        )

    def trim_outbox(self, delivered: int) -> None:
        partition = self._owned()
        del partition.outbox[:delivered]

    def _partition(self) -> MemoryPartition:
        return self.store.partitions[self.scope]

    def _owned(self) -> MemoryPartition:
        """The partition, checked before any write: the store answers and the epoch is ours."""
        self.store.check_available()
        partition = self._partition()
        if partition.epoch != self.epoch:
            raise FencedError(
                f"partition {self.scope!r} has a new owner (epoch {partition.epoch}, this "
                f"worker holds {self.epoch}); this worker's write was refused"
            )
        return partition
