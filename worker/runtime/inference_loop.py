"""The Kafka worker's inference thread: one PartitionCheckpointer per owned partition.

Messages come through the Inbox (inbox.py: in order, but revokes and losses first); replies
tell the polling thread where a claimed partition's state stops (Ready), how far each
partition is applied (Progress, for lag), which offsets it may commit (CommitOffset) and
which partitions it dropped because another worker's claim fenced them off (Fenced).
The checkpointers are this thread's alone, and so is the budget of live streams their
processors share: a batch that needs the room of unsaved streams is cut there, every
partition holding unsaved streams is checkpointed (its fenced commit), and then they may go.
A due checkpoint's write runs on the writer thread, beside the next batches; its outcome is
taken back here before each message.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
from kafka import TopicPartition

from cache_store.partition import PartitionLease, PartitionStore, StoreUnavailableError
from worker.io.kafka_output import OutputProducer
from worker.ops.metrics import WorkerMetrics
from worker.runtime.inbox import Batch, Claim, Inbox, Lost, Revoke, Stop
from worker.runtime.kafka_settings import WorkerSettings
from worker.runtime.partition_checkpointer import RETRY_SECONDS, PartitionCheckpointer
from worker.stream.commentator import Commentator
from worker.stream.live_budget import LiveBudget
from worker.stream.processor import LiveKey, StreamProcessor, admit_together, apply_together
from worker.stream.records import Record
from worker.stream.session_state import expected_writer

log = structlog.get_logger("streamsink.worker")


# Replies to the polling thread.
@dataclass(frozen=True)
class Ready:
    partition: TopicPartition
    next_offset: int | None


@dataclass(frozen=True)
class Progress:
    partition: TopicPartition
    next_offset: int


@dataclass(frozen=True)
class CommitOffset:
    partition: TopicPartition
    offset: int


@dataclass(frozen=True)
class Fenced:
    """A write was fenced off and the partition dropped: another worker claimed it. If the
    group leaves it here all the same, the polling thread claims it again (reclaim.py)."""

    partition: TopicPartition


def _whole_batches(admitted: int, sizes: list[int]) -> int:
    """How many leading batches of these sizes `admitted` records cover whole."""
    whole = 0
    for size in sizes:
        if admitted < size:
            break
        admitted -= size
        whole += 1
    return whole


class InferenceLoop:
    """Runs on the inference thread until Stop; `failure` holds what ended it otherwise."""

    def __init__(
        self,
        commentator: Commentator,
        store: PartitionStore,
        producer: OutputProducer,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        inbox: Inbox,
        replies: queue.Queue,
    ) -> None:
        self.commentator, self.store, self.producer = commentator, store, producer
        self.settings, self.metrics = settings, metrics
        self.inbox, self.replies = inbox, replies
        self.stopping = threading.Event()  # set by the polling thread: give up retries
        self.failure: BaseException | None = None
        self._owned: dict[TopicPartition, PartitionCheckpointer] = {}
        self.live: LiveBudget[LiveKey] = LiveBudget(settings.process.max_live_streams)
        # One thread writes the checkpoints (Redis commit, then output delivery), in order.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # surfaced by the polling thread, which then stops
            log.exception("inference thread failed")
            self.failure = error
        finally:
            self.writer.shutdown(wait=True)

    def _loop(self) -> None:
        while True:
            try:
                message = self.inbox.get(timeout=0.5)
            except queue.Empty:
                message = None
            self._take_written()  # a write refused there drops its partition, idle or not
            if message is None:
                self._on_idle()
            elif isinstance(message, Stop):
                for partition in list(self._owned):
                    self._release(partition, checkpoint=True)
                return
            else:
                self._handle(message)
            self._update_gauges()

    def _handle(self, message: Claim | Batch | Revoke | Lost) -> None:
        if isinstance(message, Batch):
            self._apply_together(self.inbox.batches_next(message))
        elif isinstance(message, Claim):
            self._claim(message.partition)
        elif isinstance(message, Revoke):
            for partition in message.partitions:
                self._release(partition, checkpoint=True)
            message.done.set()
        else:
            for partition in message.partitions:
                self._release(partition, checkpoint=False)

    def _claim(self, partition: TopicPartition) -> None:
        stale = self._owned.get(partition)
        if stale is not None:  # a claim again: what is not committed is read again anyway
            stale.finish()
            self._settle(partition, stale)
            self._drop(partition)
        scope = f"{partition.topic}/{partition.partition}"
        lease = self._claim_lease(scope)
        if lease is None:
            return
        checkpointer = PartitionCheckpointer(
            partition,
            lease,
            self._processor(lease),
            self.producer,
            self.settings.schedule,
            self.metrics,
            flush_seconds=self.settings.group.shutdown_seconds / 2,
            writer=self.writer,
        )
        self._owned[partition] = checkpointer
        log.info(
            "partition claimed",
            partition=partition.partition,
            epoch=lease.epoch,
            next_offset=lease.next_offset,
            outbox=len(lease.outbox),
        )
        checkpointer.replay_outbox()
        self._settle(partition, checkpointer)
        self.replies.put(Ready(partition, lease.next_offset))

    def _processor(self, lease: PartitionLease) -> StreamProcessor:
        writer = expected_writer(self.commentator)
        return StreamProcessor(
            self.commentator,
            lambda stream_id: lease.load(stream_id, writer),
            self.metrics,
            self.settings.process,
            self.live,
        )

    def _apply_together(self, batches: list[Batch]) -> None:
        """Batches of several partitions: those that fit the live budget together, from the
        first on, in one scheduler run (their streams share forwards); the others one by one,
        making room as they need."""
        owned = [(b, self._owned[b.partition]) for b in batches if b.partition in self._owned]
        if not owned:
            return  # fetched before a revoke, or fenced off meanwhile: the next owner reads it
        work = [(checkpointer.processor, batch.records) for batch, checkpointer in owned]
        fitting = _whole_batches(admit_together(work), [len(b.records) for b, _ in owned])
        applied = []
        # If a state cannot be read, none is applied: each waits for the store on its own.
        with contextlib.suppress(StoreUnavailableError):
            applied = apply_together(work[:fitting]) if fitting > 1 else []
        for (batch, checkpointer), result in zip(owned, applied, strict=False):
            checkpointer.took(batch.records, result)
            self._applied(batch.partition, checkpointer)
        for batch, _ in owned[len(applied) :]:
            self._apply(batch)

    def _apply(self, batch: Batch) -> None:
        checkpointer = self._owned.get(batch.partition)
        if checkpointer is None:
            return  # fetched before a revoke, or a partition fenced off meanwhile
        records = batch.records
        while records:
            try:
                admitted = checkpointer.processor.admit(records) or self._make_room(
                    checkpointer, records
                )
                if checkpointer.fenced:
                    return  # another worker owns the partition now; it was dropped
                checkpointer.apply(records[:admitted])
            except StoreUnavailableError as error:
                if not self._wait_for_store(error):
                    return  # stopping: what is applied is released, the rest is read again
                continue
            records = records[admitted:]
        self._applied(batch.partition, checkpointer)

    def _applied(self, partition: TopicPartition, checkpointer: PartitionCheckpointer) -> None:
        self.replies.put(Progress(partition, checkpointer.next_offset))
        if checkpointer.due():
            self._checkpoint(partition, checkpointer)

    def _make_room(self, checkpointer: PartitionCheckpointer, records: list[Record]) -> int:
        """Checkpoint every partition with unsaved streams, so their caches may go; how many
        of `records` fit then. Where a commit failed (the store is out) the rest of the batch
        runs over budget rather than wait: nothing is lost by it, the next batch tries again."""
        for partition, other in list(self._owned.items()):
            if other.processor.has_unsaved:
                other.checkpoint()  # waited for: its streams may go only once committed
                self._settle(partition, other)
        if checkpointer.fenced:
            return 0
        admitted = checkpointer.processor.admit(records)
        if not admitted:
            self.metrics.errors.labels(kind="over_live_budget").inc()
            log.warning("over the live budget until the store takes checkpoints again")
        return admitted or len(records)

    def _wait_for_store(self, error: StoreUnavailableError) -> bool:
        """A stream's state could not be read: wait, as for a claim; False once stopping."""
        self.metrics.errors.labels(kind="redis_unavailable").inc()
        log.warning("restore postponed", error=str(error))
        return not self.stopping.wait(RETRY_SECONDS)

    def _on_idle(self) -> None:
        """Fire time triggers and time-based checkpoints while no records arrive."""
        for partition, checkpointer in list(self._owned.items()):
            checkpointer.fire_timers()
            if checkpointer.due():
                self._checkpoint(partition, checkpointer)

    def _checkpoint(self, partition: TopicPartition, checkpointer: PartitionCheckpointer) -> None:
        """Start a checkpoint; its write overlaps what this thread does next."""
        checkpointer.start_checkpoint()
        self._settle(partition, checkpointer)

    def _take_written(self) -> None:
        """The outcomes of the checkpoints whose writes have ended."""
        for partition, checkpointer in list(self._owned.items()):
            checkpointer.poll()
            self._settle(partition, checkpointer)

    def _release(self, partition: TopicPartition, checkpoint: bool) -> None:
        checkpointer = self._owned.get(partition)
        if checkpointer is None:
            return
        checkpointer.release(checkpoint, self.settings.group.shutdown_seconds, self.stopping)
        self._settle(partition, checkpointer)
        self._drop(partition)
        log.info("partition released", partition=partition.partition, checkpointed=checkpoint)

    def _settle(self, partition: TopicPartition, checkpointer: PartitionCheckpointer) -> None:
        """Pass on the offset a commit made safe; forget the partition if it was fenced."""
        offset = checkpointer.take_offset_to_commit()
        if offset is not None:
            self.replies.put(CommitOffset(partition, offset))
        if checkpointer.fenced:
            self._drop(partition)
            self.replies.put(Fenced(partition))

    def _drop(self, partition: TopicPartition) -> None:
        """Forget a partition and its streams' caches."""
        checkpointer = self._owned.pop(partition, None)
        if checkpointer is not None:
            checkpointer.finish()
            checkpointer.processor.close()

    def _claim_lease(self, scope: str) -> PartitionLease | None:
        """Retry while the store is down, until the worker stops."""
        while not self.stopping.is_set():
            try:
                return self.store.claim(scope)
            except StoreUnavailableError as error:
                self.metrics.errors.labels(kind="redis_unavailable").inc()
                log.warning("claim postponed", error=str(error))
                self.stopping.wait(RETRY_SECONDS)
        return None

    def _update_gauges(self) -> None:
        self.metrics.partitions_owned.set(len(self._owned))
