"""The distributed worker: a Kafka consumer group in, commentary out, states in Redis.

Two threads. The polling thread owns the KafkaConsumer (it is not thread-safe): it polls,
hands batches to the inference thread, pauses partitions while that thread is behind, seeks
newly claimed partitions and commits offsets. It never waits on the model, so a slow step
never drops the worker from its group. The inference thread owns the sessions and runs the
checkpoint protocol per partition (DESIGN.md): write blocks, one fenced commit in Redis
(states, next offset, outbox), produce the outbox, trim it, then have the offset committed.

kafka-python calls the rebalance listener on its IO thread. A revoke waits there, bounded by
the shutdown budget, until the inference thread has checkpointed the revoked partitions, so
the next owner finds them complete; a lost partition (this worker was evicted) is dropped
without a write, since its epoch is stale anyway.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from cache_store.redis.store import (
    Claim,
    FencedError,
    OutboxEntry,
    RedisStore,
    StoreUnavailableError,
)
from worker.exceptions import StreamsinkError
from worker.io.kafka_connection import KafkaConnection
from worker.io.kafka_output import OutputProducer, commentary_payload, to_record
from worker.ops.health import Health
from worker.ops.metrics import WorkerMetrics
from worker.stream.commentator import Engine
from worker.stream.processor import ProcessSettings, StreamProcessor
from worker.stream.records import Commentary, Record

log = structlog.get_logger("streamsink.worker")

_RETRY_SECONDS = 1.0  # pause between attempts while Redis or Kafka is unavailable
TOPIC_WAIT_SECONDS = 60.0  # how long a starting worker waits for its input topic to appear


class StateLossPolicy(StrEnum):
    """What to do when Redis knows less of a partition than Kafka's committed offset says."""

    REPLAY = "replay"  # reprocess from where Redis stands (or the earliest record): no gap
    RESUME = "resume"  # continue at Kafka's committed offset: the lost span gets no commentary


@dataclass(frozen=True)
class WorkerSettings:
    input_topic: str
    output_topic: str
    group: str
    dead_letter_topic: str | None = None
    checkpoint_every_records: int = 256
    checkpoint_every_seconds: float = 10.0
    shutdown_seconds: float = 60.0
    session_timeout_ms: int = 30000
    max_poll_records: int = 64
    max_queued_batches: int = 8
    on_state_loss: StateLossPolicy = StateLossPolicy.REPLAY
    process: ProcessSettings = ProcessSettings()


# Messages to the inference thread, in the order the polling side saw things happen.
@dataclass(frozen=True)
class _Claim:
    partition: TopicPartition


@dataclass(frozen=True)
class _Batch:
    partition: TopicPartition
    records: list[Record]


@dataclass(frozen=True)
class _Revoke:
    partitions: frozenset[TopicPartition]
    done: threading.Event


@dataclass(frozen=True)
class _Lost:
    partitions: frozenset[TopicPartition]


class _Stop:
    pass


# Replies to the polling thread.
@dataclass(frozen=True)
class _Ready:
    partition: TopicPartition
    next_offset: int | None


@dataclass(frozen=True)
class _CommitOffset:
    partition: TopicPartition
    offset: int


@dataclass
class _Owned:
    """A partition this worker owns: its claim, sessions and not yet delivered commentary."""

    partition: TopicPartition
    claim: Claim
    processor: StreamProcessor
    next_offset: int | None
    committed_offset: int | None
    undelivered: list[OutboxEntry]  # committed to the outbox, not yet produced and trimmed
    pending: list[OutboxEntry] = field(default_factory=list)  # produced since the last commit
    since_checkpoint: int = 0
    last_checkpoint: float = field(default_factory=time.monotonic)

    @property
    def scope(self) -> str:
        return self.claim.scope


class KafkaWorker:
    def __init__(
        self,
        engine: Engine,
        connection: KafkaConnection,
        store: RedisStore,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        health: Health,
    ) -> None:
        self.engine, self.connection, self.store = engine, connection, store
        self.settings, self.metrics, self.health = settings, metrics, health
        self.producer = OutputProducer(
            connection, settings.output_topic, settings.dead_letter_topic
        )
        self._to_inference: queue.Queue = queue.Queue()
        self._to_polling: queue.Queue = queue.Queue()
        self._ready: set[TopicPartition] = set()  # claimed and sought: batches may flow
        self._ready_lock = threading.Lock()
        self._owned: dict[TopicPartition, _Owned] = {}  # inference thread only
        self._stopping = threading.Event()  # inference thread: give up retries, finish up
        self._closing = False
        self._backpressure = False
        self._failure: BaseException | None = None

    # The polling thread ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set, then checkpoint everything and leave the group."""
        s = self.settings
        consumer = KafkaConsumer(
            **self.connection.client_config(),
            group_id=s.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            partition_assignment_strategy=[CooperativeStickyAssignor],
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(100, s.session_timeout_ms // 10),
            max_poll_records=s.max_poll_records,
        )
        self._wait_for_topic(consumer, stop)
        inference = threading.Thread(target=self._infer, name="inference", daemon=True)
        inference.start()
        consumer.subscribe([s.input_topic], listener=_Listener(self))
        log.info("worker started", group=s.group, input_topic=s.input_topic)
        try:
            while not stop.is_set() and inference.is_alive():
                self._handle_replies(consumer)
                for partition, messages in consumer.poll(timeout_ms=200).items():
                    if self._is_ready(partition):  # else: sought again once claimed
                        records = [to_record(message) for message in messages]
                        self._to_inference.put(_Batch(partition, records))
                self._pause_unclaimed(consumer)
                self._apply_backpressure(consumer)
                self._report_lag(consumer)
                self.health.beat()
        finally:
            self._shut_down(consumer, inference)
        if self._failure is not None:
            raise self._failure

    def _wait_for_topic(self, consumer: KafkaConsumer, stop: threading.Event) -> None:
        """Join only once the input topic's partitions are known: a group that joins before
        its members see the topic can settle on an empty assignment."""
        deadline = time.monotonic() + TOPIC_WAIT_SECONDS
        while not consumer.partitions_for_topic(self.settings.input_topic):
            if stop.is_set() or time.monotonic() > deadline:
                consumer.close(autocommit=False)
                raise StreamsinkError(
                    f"input topic {self.settings.input_topic!r} does not exist (or is not "
                    "visible to this worker); create it with `streamsink topics create`"
                )
            time.sleep(_RETRY_SECONDS)

    def _shut_down(self, consumer: KafkaConsumer, inference: threading.Thread) -> None:
        log.info("worker stopping: final checkpoint")
        self._to_inference.put(_Stop())
        inference.join(self.settings.shutdown_seconds)
        if inference.is_alive():
            self._stopping.set()
            log.error(
                "final checkpoint did not finish in time", seconds=self.settings.shutdown_seconds
            )
        self._handle_replies(consumer)
        self._closing = True
        consumer.close(autocommit=False, timeout_ms=5000)
        self.producer.close()
        self.store.close()
        summary = {
            name: self.metrics.value(f"streamsink_{name}")
            for name in (
                "records",
                "commentaries",
                "restored_streams",
                "new_streams",
                "prefill_tokens",
                "fenced_writes",
                "bad_states",
                "dead_letter_records",
                "replayed_outputs",
            )
        }
        log.info("worker stopped", **summary)

    def _is_ready(self, partition: TopicPartition) -> bool:
        with self._ready_lock:
            return partition in self._ready

    def _handle_replies(self, consumer: KafkaConsumer) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        while True:
            try:
                reply = self._to_polling.get_nowait()
            except queue.Empty:
                break
            if isinstance(reply, _Ready):
                self._start_consuming(consumer, reply)
            elif reply.partition in consumer.assignment():
                offsets[reply.partition] = OffsetAndMetadata(reply.offset, "", -1)
        if offsets:
            consumer.commit_async(offsets)  # for lag and autoscaling; Redis is the truth

    def _start_consuming(self, consumer: KafkaConsumer, ready: _Ready) -> None:
        """Seek a claimed partition to where its committed state stops, then let it flow."""
        partition = ready.partition
        if partition not in consumer.assignment():
            return
        committed = consumer.committed(partition)
        if committed is not None and (ready.next_offset is None or ready.next_offset < committed):
            self.metrics.errors.labels(kind="state_behind_kafka").inc()
            log.error(
                "Redis is behind Kafka's committed offset: states were lost",
                partition=partition.partition,
                redis_offset=ready.next_offset,
                kafka_offset=committed,
                policy=str(self.settings.on_state_loss),
            )
            if self.settings.on_state_loss is StateLossPolicy.RESUME:
                consumer.seek(partition, committed)
            elif ready.next_offset is None:
                consumer.seek_to_beginning(partition)
            else:
                consumer.seek(partition, ready.next_offset)
        elif ready.next_offset is None:
            consumer.seek_to_beginning(partition)
        else:
            consumer.seek(partition, ready.next_offset)
        with self._ready_lock:
            self._ready.add(partition)
        if not self._backpressure:
            consumer.resume(partition)

    def _pause_unclaimed(self, consumer: KafkaConsumer) -> None:
        """Fetch nothing for a new partition until its claim says where its state stops."""
        assigned, paused = consumer.assignment(), consumer.paused()
        with self._ready_lock:  # never held across a consumer call: the IO thread takes it
            unclaimed = assigned - self._ready - paused
        if unclaimed:
            consumer.pause(*unclaimed)

    def _apply_backpressure(self, consumer: KafkaConsumer) -> None:
        """Pause while the inference thread is behind; paused partitions keep their position."""
        queued = self._to_inference.qsize()
        with self._ready_lock:
            ready = list(self._ready)
        if not self._backpressure and queued >= self.settings.max_queued_batches:
            self._backpressure = True
            consumer.pause(*ready)
        elif self._backpressure and queued <= self.settings.max_queued_batches // 2:
            self._backpressure = False
            consumer.resume(*ready)

    def _report_lag(self, consumer: KafkaConsumer) -> None:
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            owned = self._owned.get(partition)
            if highwater is not None and owned is not None and owned.next_offset is not None:
                lag = max(0, highwater - owned.next_offset)
                self.metrics.consumer_lag.labels(partition=str(partition.partition)).set(lag)

    # The rebalance listener (kafka-python's IO thread) ----------------------------------------

    # Only queues and flags here: calling into the consumer from its own IO thread can
    # deadlock with the polling thread, which holds the consumer's locks while it waits.
    def on_assigned(self, added: set[TopicPartition]) -> None:
        self.health.group_joined = True
        log.info("group joined", added=sorted(p.partition for p in added))
        for partition in sorted(added):
            log.info("partition assigned", partition=partition.partition)
            self._to_inference.put(_Claim(partition))

    def on_revoked(self, revoked: set[TopicPartition]) -> None:
        if self._closing or not revoked:
            return  # closing: everything was checkpointed already
        log.info("partitions revoked", partitions=sorted(p.partition for p in revoked))
        with self._ready_lock:
            self._ready -= revoked
        done = threading.Event()
        self._to_inference.put(_Revoke(frozenset(revoked), done))
        if not done.wait(self.settings.shutdown_seconds):
            log.error("revoked partitions not checkpointed in time", partitions=sorted(revoked))

    def on_lost(self, lost: set[TopicPartition]) -> None:
        log.warning("partitions lost", partitions=sorted(p.partition for p in lost))
        with self._ready_lock:
            self._ready -= lost
        self._to_inference.put(_Lost(frozenset(lost)))

    # The inference thread ------------------------------------------------------------------------

    def _infer(self) -> None:
        try:
            self._infer_loop()
        except BaseException as error:  # surfaced by the polling thread, which then stops
            log.exception("inference thread failed")
            self._failure = error

    def _infer_loop(self) -> None:
        while True:
            try:
                message = self._to_inference.get(timeout=0.5)
            except queue.Empty:
                self._on_idle()
                continue
            if isinstance(message, _Batch):
                self._apply(message)
            elif isinstance(message, _Claim):
                self._claim(message.partition)
            elif isinstance(message, _Revoke):
                for partition in message.partitions:
                    self._release(partition, checkpoint=True)
                message.done.set()
            elif isinstance(message, _Lost):
                for partition in message.partitions:
                    self._release(partition, checkpoint=False)
            else:
                for partition in list(self._owned):
                    self._release(partition, checkpoint=True)
                return
            self._update_gauges()

    def _claim(self, partition: TopicPartition) -> None:
        scope = f"{partition.topic}/{partition.partition}"
        claim = self._retrying(lambda: self.store.claim(scope), "claim")
        if claim is None:
            return
        fingerprint = self.engine.loaded.fingerprint
        processor = StreamProcessor(
            self.engine,
            lambda stream_id: self.store.load_in(scope, stream_id, fingerprint),
            self.metrics,
            self.settings.process,
            on_reject=lambda record, error: self.producer.send_dead_letter(
                partition.topic, record, error
            ),
        )
        owned = _Owned(
            partition, claim, processor, claim.next_offset, claim.next_offset, list(claim.outbox)
        )
        self._owned[partition] = owned
        log.info(
            "partition claimed",
            partition=partition.partition,
            epoch=claim.epoch,
            next_offset=claim.next_offset,
            outbox=len(claim.outbox),
        )
        if claim.outbox:
            self.metrics.replayed_outputs.inc(len(claim.outbox))
            self._deliver(owned)
        self._to_polling.put(_Ready(partition, claim.next_offset))

    def _apply(self, batch: _Batch) -> None:
        owned = self._owned.get(batch.partition)
        if owned is None:
            return  # fetched before a revoke: the next owner reads it again
        with structlog.contextvars.bound_contextvars(partition=batch.partition.partition):
            produced = owned.processor.apply(batch.records)
            produced += owned.processor.comment_on_timers()
        self._queue_output(owned, produced)
        owned.next_offset = batch.records[-1].offset + 1
        owned.since_checkpoint += len(batch.records)
        if owned.since_checkpoint >= self.settings.checkpoint_every_records:
            self._checkpoint(owned)

    def _on_idle(self) -> None:
        """Fire time triggers and time-based checkpoints while no records arrive."""
        for owned in list(self._owned.values()):
            self._queue_output(owned, owned.processor.comment_on_timers())
            overdue = time.monotonic() - owned.last_checkpoint
            if overdue >= self.settings.checkpoint_every_seconds:
                self._checkpoint(owned)

    def _queue_output(self, owned: _Owned, produced: list[Commentary]) -> None:
        owned.pending += [OutboxEntry(c.stream_id, c.seq, commentary_payload(c)) for c in produced]

    def _checkpoint(self, owned: _Owned) -> bool:
        """Commit the partition's changes, then deliver; False if it could not be committed."""
        owned.last_checkpoint = time.monotonic()
        changed = owned.processor.dirty or owned.pending
        if changed or owned.next_offset != owned.committed_offset:
            states = owned.processor.changed_states()
            try:
                report = self.store.commit(
                    owned.claim, owned.scope, states, owned.next_offset, owned.pending
                )
            except FencedError as error:
                self._fenced(owned, error)
                return False
            except StoreUnavailableError as error:
                self.metrics.errors.labels(kind="redis_unavailable").inc()
                log.warning("checkpoint postponed", error=str(error))
                return False
            self.metrics.checkpoints.inc()
            self.metrics.checkpoint_bytes.inc(report.bytes_written)
            self.metrics.checkpoint_seconds.observe(report.seconds)
            owned.processor.mark_saved()
            owned.undelivered += owned.pending
            owned.pending = []
            owned.committed_offset = owned.next_offset
            owned.since_checkpoint = 0
            if owned.next_offset is not None:
                self._to_polling.put(_CommitOffset(owned.partition, owned.next_offset))
        return self._deliver(owned)

    def _deliver(self, owned: _Owned) -> bool:
        """Produce the committed outbox, then trim it; a replay re-sends, never regenerates."""
        if not owned.undelivered:
            return True
        for entry in owned.undelivered:
            self.producer.send_commentary(entry.stream_id, entry.payload)
        try:
            self.producer.flush(timeout=self.settings.shutdown_seconds / 2)
            self.store.trim_outbox(owned.claim, len(owned.undelivered))
        except FencedError as error:
            self._fenced(owned, error)
            return False
        except (KafkaError, StoreUnavailableError) as error:
            self.metrics.errors.labels(kind="delivery").inc()
            log.warning("delivery postponed", error=str(error), entries=len(owned.undelivered))
            return False
        owned.undelivered = []
        return True

    def _fenced(self, owned: _Owned, error: FencedError) -> None:
        """Another worker owns the partition: forget it, keep nothing this worker computed."""
        self.metrics.fenced_writes.inc()
        log.error(
            "write fenced off: partition moved",
            partition=owned.partition.partition,
            error=str(error),
        )
        self._owned.pop(owned.partition, None)

    def _release(self, partition: TopicPartition, checkpoint: bool) -> None:
        owned = self._owned.get(partition)
        if owned is None:
            return
        if checkpoint:
            deadline = time.monotonic() + self.settings.shutdown_seconds
            while not self._checkpoint(owned) and partition in self._owned:
                if time.monotonic() > deadline or self._stopping.is_set():
                    log.error(
                        "partition released without its last checkpoint",
                        partition=partition.partition,
                    )
                    break
                time.sleep(_RETRY_SECONDS)
        self._owned.pop(partition, None)
        log.info("partition released", partition=partition.partition, checkpointed=checkpoint)

    def _retrying(self, attempt, what: str) -> Claim | None:
        """Retry while Redis is down, until the worker stops."""
        while not self._stopping.is_set():
            try:
                return attempt()
            except StoreUnavailableError as error:
                self.metrics.errors.labels(kind="redis_unavailable").inc()
                log.warning(f"{what} postponed", error=str(error))
                time.sleep(_RETRY_SECONDS)
        return None

    def _update_gauges(self) -> None:
        self.metrics.partitions_owned.set(len(self._owned))
        self.metrics.streams_owned.set(
            sum(len(owned.processor.sessions) for owned in self._owned.values())
        )


class _Listener(ConsumerRebalanceListener):
    """Assigned, revoked and lost partitions, each handled its own way (KIP-429)."""

    def __init__(self, worker: KafkaWorker) -> None:
        self.worker = worker

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.worker.on_assigned(set(assigned))

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.worker.on_revoked(set(revoked))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.worker.on_lost(set(lost))
