"""The partition protocol of the distributed worker, apart from any one store.

A worker that is assigned a partition claims it: the claim bumps the partition's epoch, and
the lease it returns is this worker's token. Every write through the lease is refused with
FencedError once a later claim exists, so a paused or evicted worker (a zombie) cannot
overwrite what the new owner committed. One commit carries the changed states, the next
input offset and the commentary to deliver (the outbox), all or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgpack

from cache_store.exceptions import StateError
from cache_store.state import StreamState
from cache_store.store import SaveReport


class FencedError(StateError):
    """Another worker owns the partition now; this worker's writes to it are refused."""


class StoreUnavailableError(StateError):
    """The store did not answer within the retry budget; nothing was lost, try again later."""


@dataclass(frozen=True)
class OutboxEntry:
    """One committed commentary awaiting delivery; (stream_id, seq) identifies it."""

    stream_id: str
    seq: int
    payload: bytes

    def pack(self) -> bytes:
        return msgpack.packb([self.stream_id, self.seq, self.payload])

    @classmethod
    def unpack(cls, raw: bytes) -> OutboxEntry:
        stream_id, seq, payload = msgpack.unpackb(raw)
        return cls(stream_id, seq, payload)


class PartitionLease(Protocol):
    """One owner's hold on a partition: what the last owner left, and fenced writes."""

    @property
    def scope(self) -> str: ...

    @property
    def epoch(self) -> int: ...

    @property
    def next_offset(self) -> int | None:
        """Next input offset the committed states cover; None if nothing was committed."""

    @property
    def outbox(self) -> tuple[OutboxEntry, ...]:
        """Commentary committed but not known to be delivered when the lease was taken."""

    def load(self, stream_id: str, expected_fingerprint: str | None = None) -> StreamState | None:
        """The stream's committed state in this partition, or None; StateError if unusable."""

    def commit(
        self,
        states: Sequence[StreamState],
        next_offset: int | None,
        outbox: Sequence[OutboxEntry] = (),
    ) -> SaveReport:
        """Replace the states, record the offset, append the outbox: all or nothing.

        Raises FencedError unless this lease's epoch is still the partition's current one.
        """

    def trim_outbox(self, delivered: int) -> None:
        """Drop the first `delivered` outbox entries, now delivered; fenced like a commit."""


class PartitionStore(Protocol):
    """Where partitions' states live, for workers that own partitions in turn."""

    def claim(self, scope: str) -> PartitionLease:
        """Become the owner of `scope`; every earlier lease of it is fenced off from now on."""

    def close(self) -> None:
        """Release connections; the leases taken from this store are unusable afterwards."""
