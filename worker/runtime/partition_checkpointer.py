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
Output that may have been sent already (the outbox a takeover replays, and what a failed
flush left) is in doubt: its commentary is sent again and counted as redelivered, (stream id,
seq) telling consumers it is a repeat, and its dead letters are first looked up on their topic
and sent only if missing, so each bad record is there once.
A fenced write means another worker owns the partition: the checkpointer sets `fenced` and
does nothing more, and its owner drops it.

Given a writer (one thread of the worker's), a checkpoint started with `start_checkpoint`
overlaps the next batches: the snapshot is taken on the calling thread (the caches move on
after it), the commit and the delivery run on the writer, and `poll` or `finish` take their
outcome back on the calling thread. One checkpoint of a partition is in flight at a time; every
other step that needs its outcome (the next checkpoint, a release, a stream restored while its
snapshot is being saved) waits for it first. While one is in flight the writer alone touches
what is committed and not yet delivered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import structlog
from kafka import TopicPartition
from kafka.errors import KafkaError

from cache_store.exceptions import MissingBlocksError
from cache_store.partition import (
    FencedError,
    OutboxEntry,
    OutboxKind,
    PartitionLease,
    StoreUnavailableError,
)
from cache_store.store import SaveReport
from worker.exceptions import BadRecordError
from worker.io.kafka_output import commentary_payload, dead_letter_headers, dead_letter_source
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointClock, CheckpointSchedule
from worker.stream.processor import Applied, Saving, StreamProcessor
from worker.stream.records import Commentary, Record

log = structlog.get_logger("streamsink.worker")

RETRY_SECONDS = 1.0  # pause between attempts of a release while the store is unavailable
CLOCK_STEP_MS = 60_000  # how far back of a dead letter's making its copies are looked up


class Delivery(Protocol):
    """Where committed output goes; OutputProducer is one."""

    def send_commentary(self, stream_id: str, payload: bytes) -> None: ...

    def send_dead_letter(
        self, key: str | None, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None: ...

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything sent is acknowledged; raises KafkaError if it is not."""

    def settle(self, timeout: float | None = None) -> None:
        """Wait until everything sent is taken or given up, whichever; KafkaError if the wait
        runs out."""

    def dead_letters_since(self, since_ms: int, timeout: float) -> set[bytes]:
        """The sources of the dead letters on the topic stamped `since_ms` or later."""


WriteError = FencedError | StoreUnavailableError | MissingBlocksError | KafkaError


@dataclass(frozen=True)
class _Written:
    """How a checkpoint's write ended: the commit (if it had one to make), then the delivery."""

    saving: Saving | None
    next_offset: int | None
    entries: list[OutboxEntry]
    report: SaveReport | None = None
    commit_error: WriteError | None = None
    delivery_error: WriteError | None = None


def _run_now(job: Callable[[], _Written]) -> Future[_Written]:
    """A checkpointer without a writer writes on the calling thread."""
    done: Future[_Written] = Future()
    done.set_result(job())
    return done


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
        writer: Executor | None = None,
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
        self._in_doubt = bool(lease.outbox)  # the unflushed ones may be on the topics already
        self._pending: list[OutboxEntry] = []  # produced since the last commit
        self._offset_to_commit: int | None = None
        self._submit = _run_now if writer is None else writer.submit
        self._in_flight: Future[_Written] | None = None
        processor.await_saving = self.finish

    def replay_outbox(self) -> bool:
        """Re-send what the last owner committed but did not trim; False if not delivered.

        The last owner may have delivered some of it already: its commentary counts as
        redelivered (`streamsink_redelivered_commentaries_total`), as a consumer may see it
        twice, and its dead letters are sent only if they are not on the topic.
        """
        self.metrics.replayed_outputs.inc(len(self.lease.outbox))
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
        """Commit, then deliver, and wait for both; False if either could not be done (see
        `fenced`)."""
        self.start_checkpoint()
        return self.finish()

    def start_checkpoint(self) -> None:
        """Snapshot the changed streams here, then commit and deliver on the writer; the
        checkpoint in flight, if any, is finished first."""
        self.finish()
        if self.fenced:
            return
        self._clock.reset()
        if self._uncommitted():
            saving, entries = self.processor.take_changed(), self._pending
            self._pending = []
            self._in_flight = self._submit(partial(self._write, saving, self.next_offset, entries))
        elif self._undelivered:
            self._in_flight = self._submit(self._write_delivery)

    def poll(self) -> None:
        """Take the outcome of the checkpoint in flight if it has ended; never waits."""
        if self._in_flight is not None and self._in_flight.done():
            self.finish()

    def finish(self) -> bool:
        """Wait for the checkpoint in flight and take its outcome; False if it failed."""
        if self._in_flight is None:
            return not self.fenced
        written, self._in_flight = self._in_flight.result(), None
        if written.commit_error is not None:
            self._not_committed(written)
            return False
        if written.saving is not None:
            self._committed(written)
        return self._delivered(written.delivery_error)

    def deliver(self) -> bool:
        """Produce the committed outbox, flush, then trim it; False if any of it failed."""
        self.finish()
        return self._delivered(self._deliver())

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
            self.finish()  # a write in flight is refused or lands; either way, wait for it
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

    def _write(
        self, saving: Saving, next_offset: int | None, entries: list[OutboxEntry]
    ) -> _Written:
        """On the writer: the commit, then, if it was made, the delivery."""
        try:
            report = self.lease.commit(saving.states, next_offset, entries)
        except (FencedError, StoreUnavailableError, MissingBlocksError) as error:
            return _Written(saving, next_offset, entries, commit_error=error)
        self._undelivered += entries
        return _Written(saving, next_offset, entries, report, delivery_error=self._deliver())

    def _write_delivery(self) -> _Written:
        """On the writer: the delivery of what earlier checkpoints committed."""
        return _Written(None, None, [], delivery_error=self._deliver())

    def _deliver(self) -> WriteError | None:
        """Produce the committed outbox, flush, then trim it; what failed, if anything."""
        if self.fenced or not self._undelivered:
            return None
        try:
            self._send_unflushed()
            self.lease.trim_outbox(len(self._undelivered))
        except (FencedError, KafkaError, StoreUnavailableError) as error:
            return error
        self._undelivered, self._flushed = [], 0
        return None

    def _committed(self, written: _Written) -> None:
        assert written.report is not None
        self.processor.saved()
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_bytes.inc(written.report.bytes_written)
        self.metrics.checkpoint_seconds.observe(written.report.seconds)
        self.committed_offset = written.next_offset
        if written.next_offset is not None:
            self._offset_to_commit = written.next_offset

    def _not_committed(self, written: _Written) -> None:
        """The commit was refused or not made: its streams and output wait for the next one."""
        error = written.commit_error
        self.processor.not_saved(blocks_lost=isinstance(error, MissingBlocksError))
        self._pending = written.entries + self._pending
        if isinstance(error, FencedError):
            self._fence(error)
        elif isinstance(error, MissingBlocksError):
            log.warning("saved blocks gone: the next checkpoint saves the streams whole")
        else:
            self.metrics.errors.labels(kind="redis_unavailable").inc()
            log.warning("checkpoint postponed", error=str(error))

    def _delivered(self, error: WriteError | None) -> bool:
        if isinstance(error, FencedError):
            self._fence(error)
        elif error is not None:
            self.metrics.errors.labels(kind="delivery").inc()
            log.warning("delivery postponed", error=str(error), entries=len(self._undelivered))
        return error is None and not self.fenced

    def _queue(self, produced: list[Commentary]) -> None:
        self._pending += [OutboxEntry(c.stream_id, c.seq, commentary_payload(c)) for c in produced]

    def _set_aside(self, record: Record, error: BadRecordError) -> None:
        """Dead-letter a record once committed, so a replay or a zombie sends no other copy."""
        headers = dead_letter_headers(self.topic, record, error)
        made_ms = time.time_ns() // 1_000_000
        self._pending.append(
            OutboxEntry.dead_letter(record.stream_id, record.offset, record.value, headers, made_ms)
        )

    def _send_unflushed(self) -> None:
        """Send and flush the entries not yet acknowledged. Entries a flush acknowledged are
        never sent again, even while their trim waits for Redis; those in doubt (a replay, a
        failed flush) are once the earlier sends are settled, but for dead letters already on
        their topic."""
        unflushed = self._undelivered[self._flushed :]
        if self._in_doubt:
            self.delivery.settle(timeout=self.flush_seconds)
            unflushed = self._not_dead_lettered(unflushed)
            self._count_redelivered(unflushed)
        self._in_doubt = True
        for entry in unflushed:
            self._send(entry)
        self.delivery.flush(timeout=self.flush_seconds)
        self._flushed, self._in_doubt = len(self._undelivered), False

    def _not_dead_lettered(self, entries: list[OutboxEntry]) -> list[OutboxEntry]:
        """`entries` less the dead letters their topic already has."""
        letters = [entry for entry in entries if entry.kind is OutboxKind.DEAD_LETTER]
        if not letters:
            return entries
        since_ms = max(0, min(letter.made_ms for letter in letters) - CLOCK_STEP_MS)
        there = self.delivery.dead_letters_since(since_ms, timeout=self.flush_seconds)
        missing = [
            entry
            for entry in entries
            if entry.kind is not OutboxKind.DEAD_LETTER
            or dead_letter_source(entry.headers) not in there
        ]
        if held_back := len(entries) - len(missing):
            self.metrics.dead_letters_held_back.inc(held_back)
            log.info("dead letters already on their topic, not sent again", count=held_back)
        return missing

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
