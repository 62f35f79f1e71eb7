"""The partition protocol of the distributed worker, apart from any one store.

A worker that is assigned a partition claims it: the claim bumps the partition's epoch, and
the lease it returns is this worker's token. Every write through the lease is refused with
FencedError once a later claim exists, so a paused or evicted worker (a zombie) cannot
overwrite what the new owner committed. One commit carries the changed states, the next
input offset and the output to deliver (the outbox: commentary and dead letters), all or
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import msgpack

from cache_store.exceptions import StateCorruptError, StateError, StateVersionError
from cache_store.state import Expected, StreamState
from cache_store.store import SaveReport

OUTBOX_FORMAT_VERSION = 2  # 1: commentary only, [stream_id, seq, payload]


class FencedError(StateError):
    """Another worker owns the partition now; this worker's writes to it are refused."""


class StoreUnavailableError(StateError):
    """The store did not answer within the retry budget; nothing was lost, try again later."""


class StoreRefusedError(StoreUnavailableError):
    """The store answered but refused this client (its credentials): waiting will not help."""


class OutboxKind(StrEnum):
    COMMENTARY = "commentary"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True)
class OutboxEntry:
    """One committed output awaiting delivery: a commentary or a dead letter.

    A commentary: (stream_id, seq) identifies it, the payload is its JSON. A dead letter is the
    record set aside as it came: its key (stream_id, None when it had none), its offset (seq),
    its value (payload), and why in `headers` (reason, error, source); `made_ms`, when it was
    set aside (Unix ms), bounds where a copy sent earlier can be on the topic (0: unknown).
    """

    stream_id: str | None
    seq: int
    payload: bytes
    kind: OutboxKind = OutboxKind.COMMENTARY
    headers: tuple[tuple[str, bytes], ...] = ()
    made_ms: int = 0

    @classmethod
    def dead_letter(
        cls,
        key: str | None,
        offset: int,
        value: bytes,
        headers: Sequence[tuple[str, bytes]],
        made_ms: int,
    ) -> OutboxEntry:
        return cls(key, offset, value, OutboxKind.DEAD_LETTER, tuple(headers), made_ms)

    def pack(self) -> bytes:
        """Commentary as [stream_id, seq, payload], which every version reads; a dead letter as
        a map that names its format version and kind."""
        if self.kind is OutboxKind.COMMENTARY:
            return msgpack.packb([self.stream_id, self.seq, self.payload])
        return msgpack.packb(
            {
                "v": OUTBOX_FORMAT_VERSION,
                "kind": str(self.kind),
                "key": self.stream_id,
                "offset": self.seq,
                "value": self.payload,
                "headers": [list(header) for header in self.headers],
                "made_ms": self.made_ms,
            }
        )

    @classmethod
    def unpack(cls, raw: bytes) -> OutboxEntry:
        """Either format; StateVersionError for an entry a newer streamsink wrote."""
        try:
            packed = msgpack.unpackb(raw)
            if isinstance(packed, list) and len(packed) == 3:
                return cls(*packed)
            version, kind = packed["v"], packed["kind"]
            if version <= OUTBOX_FORMAT_VERSION and kind == OutboxKind.DEAD_LETTER:
                headers = [(name, value) for name, value in packed["headers"]]
                made_ms = packed.get("made_ms", 0)  # 0: written before entries kept it
                return cls.dead_letter(
                    packed["key"], packed["offset"], packed["value"], headers, made_ms
                )
        except (KeyError, TypeError, ValueError) as error:
            raise StateCorruptError(f"an outbox entry is unreadable: {error!r}") from error
        raise StateVersionError(
            f"an outbox entry has format version {version} and kind {kind!r}, which this "
            "streamsink does not know; upgrade streamsink"
        )


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
        """Output committed but not known to be delivered when the lease was taken."""

    def load(
        self, stream_id: str, expected_fingerprint: str | Expected | None = None
    ) -> StreamState | None:
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

    def ping(self) -> None:
        """Return once the store answers; StoreUnavailableError if it does not."""

    def close(self) -> None:
        """Release connections; the leases taken from this store are unusable afterwards."""
