"""The checkpoint protocol of one partition, with no threads and no Kafka consumer.

A checkpoint (ARCHITECTURE.md, "The checkpoint protocol"), in order:

1. commit, in one call fenced on the lease's epoch: the changed streams' states, the next
   input offset, and the output since the last checkpoint (the outbox): commentary, and the
   dead letters of the records set aside;
2. deliver: produce the committed outbox, flush, then trim it (fenced too); a replay
   re-sends the committed entries, it never generates them again;
3. the owner commits the Kafka offset `take_offset_to_commit` hands it (lag, autoscaling).

Output is only delivered once committed, so what consumers see is always covered by a state
a successor restores, and a record processed again after a takeover is dead-lettered once.
A fenced write means another worker owns the partition: the checkpointer sets `fenced` and
does nothing more, and its owner drops it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Protocol

import structlog
from kafka import TopicPartition
from kafka.errors import KafkaError

from cache_store.partition import (
    FencedError,
    OutboxEntry,
    OutboxKind,
    PartitionLease,
    StoreUnavailableError,
)
from worker.exceptions import BadRecordError
from worker.io.kafka_output import commentary_payload, dead_letter_headers
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointClock, CheckpointSchedule
from worker.stream.processor import Applied, StreamProcessor
from worker.stream.records import Commentary, Record

log = structlog.get_logger("streamsink.worker")

RETRY_SECONDS = 1.0  # pause between attempts of a release while the store is unavailable


class Delivery(Protocol):
    """Where committed output goes; OutputProducer is one."""

    def send_commentary(self, stream_id: str, payload: bytes) -> None: ...

    def send_dead_letter(
        self, key: str | None, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None: ...

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything sent is acknowledged; raises KafkaError if it is not."""


class PartitionCheckpointer:
    """One owned partition: its lease, its streams, and output not yet delivered.

    The records its processor sets aside join the outbox as dead letters.
    """

    def __init__(
        self,
        source: TopicPartition,
        lease: PartitionLease,
        processor: StreamProcessor,
        delivery: Delivery,
        schedule: CheckpointSchedule,
        metrics: WorkerMetrics,
        flush_seconds: float,
    ) -> None:
        self.topic, self.partition = source.topic, source.partition
        self.lease, self.processor = lease, processor
        self.delivery, self.metrics, self.flush_seconds = delivery, metrics, flush_seconds
        self.next_offset = lease.next_offset  # after the last record applied
        self.committed_offset = lease.next_offset  # what the last commit recorded
        self.fenced = False
        self._clock = CheckpointClock(schedule)
        self._undelivered = list(lease.outbox)  # committed, not yet delivered and trimmed
        self._flushed = 0  # how many of them the outputs acknowledged (a trim may be missing)
        self._resend = False  # a flush of the unflushed ones failed: sending again may repeat
        self._pending: list[OutboxEntry] = []  # produced since the last commit
        self._offset_to_commit: int | None = None

    def replay_outbox(self) -> bool:
        """Re-send what the last owner committed but did not trim; False if not delivered.

        The last owner may have delivered some of it already: its commentary counts as
        redelivered (`streamsink_redelivered_commentaries_total`), as a consumer may see it
        twice.
        """
        if self.lease.outbox:
            self.metrics.replayed_outputs.inc(len(self.lease.outbox))
            self._count_redelivered(self.lease.outbox)
        return self.deliver()

    def apply(self, records: list[Record]) -> None:
        """Apply a batch (and any time trigger); its commentary waits for the next commit."""
        with structlog.contextvars.bound_contextvars(partition=self.partition):
            self.took(records, self.processor.apply(records))

    def took(self, records: list[Record], applied: Applied) -> None:
        """What the processor made of a batch (applied here or beside other partitions'), and
        any time trigger; its commentary waits for the next commit."""
        with structlog.contextvars.bound_contextvars(partition=self.partition):
            produced = applied.commentary + self.processor.comment_on_timers()
        for record, error in applied.set_aside:
            self._set_aside(record, error)
        self._queue(produced)
        self.next_offset = records[-1].offset + 1
        self._clock.count(len(records))

    def fire_timers(self) -> None:
        """Time triggers of streams that receive no records."""
        self._queue(self.processor.comment_on_timers())

    def due(self) -> bool:
        return not self.fenced and self._clock.due(self._uncommitted() or bool(self._undelivered))

    def checkpoint(self) -> bool:
        """Commit, then deliver; False if either could not be done (see `fenced`)."""
        if self.fenced:
            return False
        self._clock.reset()
        if self._uncommitted() and not self._commit():
            return False
        return self.deliver()

    def deliver(self) -> bool:
        """Produce the committed outbox, flush, then trim it; False if any of it failed."""
        if self.fenced:
            return False
        if not self._undelivered:
            return True
        try:
            self._send_unflushed()
            self.lease.trim_outbox(len(self._undelivered))
        except FencedError as error:
            self._fence(error)
            return False
        except (KafkaError, StoreUnavailableError) as error:
            self.metrics.errors.labels(kind="delivery").inc()
            log.warning("delivery postponed", error=str(error), entries=len(self._undelivered))
            return False
        self._undelivered, self._flushed = [], 0
        return True

    def release(
        self,
        checkpoint: bool,
        budget_seconds: float,
        stopping: threading.Event,
        retry_seconds: float = RETRY_SECONDS,
    ) -> bool:
        """Last checkpoint before the partition goes (if `checkpoint`), retried while the
        store is unavailable, until `budget_seconds` pass or `stopping` is set.

        A lost partition is released without it: its epoch is stale, any write is refused.
        """
        if not checkpoint:
            return False
        deadline = time.monotonic() + budget_seconds
        while not self.checkpoint():
            if self.fenced:
                return False
            if time.monotonic() > deadline or stopping.is_set():
                log.error(
                    "partition released without its last checkpoint", partition=self.partition
                )
                return False
            stopping.wait(retry_seconds)
        return True

    def take_offset_to_commit(self) -> int | None:
        """The Kafka offset a commit since the last call made safe to commit, once."""
        offset, self._offset_to_commit = self._offset_to_commit, None
        return offset

    def _uncommitted(self) -> bool:
        return bool(self.processor.dirty or self._pending) or (
            self.next_offset != self.committed_offset
        )

    def _commit(self) -> bool:
        try:
            report = self.processor.commit_changed(
                lambda states: self.lease.commit(states, self.next_offset, self._pending)
            )
        except FencedError as error:
            self._fence(error)
            return False
        except StoreUnavailableError as error:
            self.metrics.errors.labels(kind="redis_unavailable").inc()
            log.warning("checkpoint postponed", error=str(error))
            return False
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_bytes.inc(report.bytes_written)
        self.metrics.checkpoint_seconds.observe(report.seconds)
        self._undelivered += self._pending
        self._pending = []
        self.committed_offset = self.next_offset
        if self.next_offset is not None:
            self._offset_to_commit = self.next_offset
        return True

    def _queue(self, produced: list[Commentary]) -> None:
        self._pending += [OutboxEntry(c.stream_id, c.seq, commentary_payload(c)) for c in produced]

    def _set_aside(self, record: Record, error: BadRecordError) -> None:
        """Dead-letter a record once committed, so a replay or a zombie sends no other copy."""
        headers = dead_letter_headers(self.topic, record, error)
        self._pending.append(
            OutboxEntry.dead_letter(record.stream_id, record.offset, record.value, headers)
        )

    def _send_unflushed(self) -> None:
        """Send and flush the entries not yet acknowledged; after a failed flush, each of
        them again (the outputs may have taken some), counted as redelivered. Entries a
        flush acknowledged are never sent again, even while their trim waits for Redis."""
        unflushed = self._undelivered[self._flushed :]
        if self._resend:
            self._count_redelivered(unflushed)
        self._resend = True
        for entry in unflushed:
            self._send(entry)
        self.delivery.flush(timeout=self.flush_seconds)
        self._flushed, self._resend = len(self._undelivered), False

    def _count_redelivered(self, entries: Sequence[OutboxEntry]) -> None:
        commentary = sum(entry.kind is OutboxKind.COMMENTARY for entry in entries)
        self.metrics.redelivered_commentaries.inc(commentary)

    def _send(self, entry: OutboxEntry) -> None:
        if entry.kind is OutboxKind.DEAD_LETTER:
            self.delivery.send_dead_letter(entry.stream_id, entry.payload, entry.headers)
        else:
            self.delivery.send_commentary(entry.stream_id, entry.payload)

    def _fence(self, error: FencedError) -> None:
        """Another worker owns the partition: stop here, keep nothing this worker computed."""
        self.fenced = True
        self.metrics.fenced_writes.inc()
        log.error("write fenced off: partition moved", partition=self.partition, error=str(error))
