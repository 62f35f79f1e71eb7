"""The distributed worker: a Kafka consumer group in, commentary out, states in Redis.

Two threads. This module is the polling thread, which owns the KafkaConsumer (it is not
thread-safe): it polls, hands batches to the inference thread (inference_loop), pauses
partitions while that thread is behind (backpressure), seeks newly claimed partitions and
commits offsets. It never waits on the model, so a slow step never drops the worker from
its group. The checkpoint protocol of each partition (ARCHITECTURE.md) is the inference
thread's business, one PartitionCheckpointer per partition.

kafka-python calls the rebalance listener on its IO thread, the one that also heartbeats. A
revoke is awaited there (rebalance.py), bounded by the shutdown budget, until the inference
thread has checkpointed the revoked partitions, so the next owner finds them complete, while
heartbeats go on; a lost partition (this worker was evicted) is dropped without a write, since
its epoch is stale anyway. Either goes ahead of the batches queued for inference, which are
dropped (inbox.py).

A broker or Redis outage, as it starts or later, is waited out in place (outages.py): calls
that reach them are retried with a backoff, the brokers and Redis are asked something every
few seconds so /readyz says when they are gone, and the worker goes on once they are back.
Now and then it also asks the group who owns what (ownership.py), so a partition with lag
and no owner does not go unnoticed.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import suppress
from functools import partial

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from cache_store.partition import PartitionStore
from worker.exceptions import StreamsinkError
from worker.io.kafka_connection import KafkaConnection
from worker.io.kafka_output import OutputProducer, to_record
from worker.ops.health import Health
from worker.ops.metrics import WorkerMetrics
from worker.runtime.backpressure import PartitionGate
from worker.runtime.inbox import Batch, Claim, Inbox, Lost, Revoke, Stop
from worker.runtime.inference_loop import Fenced, InferenceLoop, Progress, Ready
from worker.runtime.kafka_settings import WorkerSettings
from worker.runtime.membership import DroppedMembership, Standing, retire
from worker.runtime.outages import KAFKA, REDIS, Outages, Unreachable
from worker.runtime.ownership import OwnershipWatch
from worker.runtime.rebalance import Handoff, RebalanceListener
from worker.runtime.reclaim import FencedPartitions
from worker.runtime.state_loss import decide_seek
from worker.stream.commentator import Commentator

log = structlog.get_logger("streamsink.worker")

_RETRY_SECONDS = 1.0  # pause between looks for the topics
TOPIC_WAIT_SECONDS = 60.0  # how long a starting worker waits for its topics to appear
BOOTSTRAP_TIMEOUT_MS = 10_000  # one attempt to reach the brokers, as a client is made
PROBE_SECONDS, PROBE_TIMEOUT_MS = 2.0, 2_000  # how often the brokers are asked, how long


class KafkaWorker:
    def __init__(
        self,
        commentator: Commentator,
        connection: KafkaConnection,
        store: PartitionStore,
        settings: WorkerSettings,
        metrics: WorkerMetrics,
        health: Health,
    ) -> None:
        self.connection, self.store = connection, store
        self.settings, self.metrics, self.health = settings, metrics, health
        self.producer = OutputProducer(
            connection,
            settings.topics.output,
            settings.topics.dead_letter,
            expiry_ms=settings.group.session_timeout_ms,
            metrics=metrics,
        )
        self._to_inference = Inbox()
        self._to_polling: queue.Queue = queue.Queue()
        self.inference = InferenceLoop(
            commentator,
            store,
            self.producer,
            settings,
            metrics,
            self._to_inference,
            self._to_polling,
        )
        self._gate = PartitionGate(settings.group.max_queued_batches)
        self._outages = Outages(health, metrics)
        self._ownership = OwnershipWatch(connection, settings.group, metrics, self._outages)
        self._partitions: list[TopicPartition] = []  # of the input topic
        self._unstarted: dict[TopicPartition, Ready] = {}  # claimed, not yet sought
        self._applied: dict[TopicPartition, int] = {}  # next offsets the inference side reported
        self._fenced = FencedPartitions(settings.group.session_timeout_ms / 1000)
        self._membership = DroppedMembership(settings.group.session_timeout_ms / 1000)
        self._next_probe = 0.0
        self._closing = False

    # The polling thread ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Consume until `stop` is set, then checkpoint everything and leave the group.

        Redis and the brokers may be down as it starts, or go down later: it waits them out.
        """
        self._outages.stop = stop
        try:
            consumer = self._connect()
        except (Unreachable, StreamsinkError) as error:
            self.producer.close()
            self.store.close()
            if isinstance(error, StreamsinkError):
                raise
            log.info("worker stopped before Redis and Kafka answered")
            return
        inference = threading.Thread(target=self.inference.run, name="inference", daemon=True)
        inference.start()
        s = self.settings
        log.info("worker started", group=s.group.name, input_topic=s.topics.input)
        try:
            while not stop.is_set() and inference.is_alive():
                consumer = self._poll_once(consumer)
        finally:
            self._shut_down(consumer, inference)
        if self.inference.failure is not None:
            raise self.inference.failure

    def _connect(self) -> KafkaConsumer:
        """Redis, then the producer, then the consumer: a consumer that fails to reach the
        brokers leaves its IO thread behind, so it is made once the producer reached them."""
        self._outages.wait_for(REDIS, "connect", self.store.ping)
        connect = partial(self.producer.connect, BOOTSTRAP_TIMEOUT_MS)
        self._outages.wait_for(KAFKA, "connect the producer", connect)
        consumer = self._new_consumer()
        self.producer.learn_topics()
        return consumer

    def _new_consumer(self) -> KafkaConsumer:
        """A consumer of the group, subscribed to the input topic, that sees the topic; its
        first poll joins.

        Subscribed before it looks for the topic, so the look gives its group coordinator the
        topic's partitions too (subscribed after, the coordinator learns them some 100 ms
        later): a leader that assigns without them rejoins once they come, a rejoin
        kafka-python 3.0.12 can strand mid-way (membership.py).
        """
        consumer = self._outages.wait_for(KAFKA, "connect the consumer", self._consumer)
        consumer.subscribe([self.settings.topics.input], listener=RebalanceListener(self))
        try:
            self._partitions = self._wait_for_topics(consumer)
        except (Unreachable, StreamsinkError):
            consumer.close(autocommit=False)
            raise
        return consumer

    def _consumer(self) -> KafkaConsumer:
        s = self.settings
        return KafkaConsumer(
            **self.connection.client_config(),
            group_id=s.group.name,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            allow_auto_create_topics=False,  # subscribed as it looks for the topic (below)
            partition_assignment_strategy=[CooperativeStickyAssignor],
            session_timeout_ms=s.group.session_timeout_ms,
            heartbeat_interval_ms=max(100, s.group.session_timeout_ms // 10),
            max_poll_records=s.group.max_poll_records,
            bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
        )

    def _poll_once(self, consumer: KafkaConsumer) -> KafkaConsumer:
        """One round of the polling thread; the consumer of the next (a new one once the group
        has dropped this one unnoticed)."""
        self._handle_replies(consumer)
        if self._dropped(self._reclaim_fenced(consumer)):
            return self._join_anew(consumer)
        self._start_claimed(consumer)
        poll = partial(consumer.poll, timeout_ms=200)
        with suppress(Unreachable):  # it returns nothing while the broker is down: no proof
            for partition, messages in self._outages.call(KAFKA, "poll", poll, False).items():
                if self._gate.is_open(partition):  # else: sought again once claimed
                    records = [to_record(message) for message in messages]
                    self._to_inference.put(Batch(partition, records))
        self._gate.pause_unclaimed(consumer)
        self._gate.apply_backpressure(consumer, self._to_inference.qsize())
        self._probe(consumer)
        if self._dropped(self._ownership.look(consumer, self._partitions)):
            return self._join_anew(consumer)
        self._report_lag(consumer)
        self.health.beat()
        return consumer

    def _probe(self, consumer: KafkaConsumer) -> None:
        """Ask the brokers and Redis something every PROBE_SECONDS, so /readyz tells when
        either went, even while the inference thread has nothing to write."""
        if time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + PROBE_SECONDS
        ask = partial(consumer.end_offsets, self._partitions, timeout_ms=PROBE_TIMEOUT_MS)
        with suppress(Unreachable):
            self._outages.call(KAFKA, "probe", ask)
        with suppress(Unreachable):
            self._outages.call(REDIS, "probe", self.store.ping)

    def _wait_for_topics(self, consumer: KafkaConsumer) -> list[TopicPartition]:
        """The input topic's partitions, once every topic of the worker is known: a group that
        joins before its members see the input topic can settle on an empty assignment, and
        the producer's look for a missing output topic blocks, logging at every retry."""
        topics = self.settings.topics.by_role()
        deadline, waited = time.monotonic() + TOPIC_WAIT_SECONDS, False

        def look() -> dict[str, set[int] | None]:
            return {role: consumer.partitions_for_topic(name) for role, name in topics.items()}

        while True:
            seen = self._outages.wait_for(KAFKA, "look for the topics", look)
            if not (missing := {role: topics[role] for role, found in seen.items() if not found}):
                return [TopicPartition(topics["input"], number) for number in sorted(seen["input"])]
            if self._outages.stop.is_set() or time.monotonic() > deadline:
                raise StreamsinkError(_missing_topics(missing))
            if not waited:
                log.warning(
                    "waiting for topics to be created",
                    topics=list(missing.values()),
                    seconds=TOPIC_WAIT_SECONDS,
                )
                waited = True
            time.sleep(_RETRY_SECONDS)

    def _shut_down(self, consumer: KafkaConsumer, inference: threading.Thread) -> None:
        log.info("worker stopping: final checkpoint")
        self._to_inference.put(Stop())
        inference.join(self.settings.group.shutdown_seconds)
        if inference.is_alive():
            self.inference.stopping.set()
            log.error(
                "final checkpoint did not finish in time",
                seconds=self.settings.group.shutdown_seconds,
            )
        self._handle_replies(consumer)
        self._closing = True
        try:
            consumer.close(autocommit=False, timeout_ms=5000)
        except KafkaError as error:  # the broker is down: the group drops this member anyway
            log.warning("leaving the group failed", error=str(error))
        self._ownership.close()
        self.producer.close()
        self.store.close()
        log.info("worker stopped", **self.metrics.summary())

    def _handle_replies(self, consumer: KafkaConsumer) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        while True:
            try:
                reply = self._to_polling.get_nowait()
            except queue.Empty:
                break
            if isinstance(reply, Ready):
                self._unstarted[reply.partition] = reply
                self._fenced.claimed(reply.partition)
            elif isinstance(reply, Fenced):
                self._gate.close({reply.partition})
                self._fenced.fenced(reply.partition, time.monotonic())
            elif isinstance(reply, Progress):
                self._applied[reply.partition] = reply.next_offset
            elif reply.partition in consumer.assignment():
                offsets[reply.partition] = OffsetAndMetadata(reply.offset, "", -1)
        if offsets:
            consumer.commit_async(offsets)  # for lag and autoscaling; Redis is the truth

    def _reclaim_fenced(self, consumer: KafkaConsumer) -> Standing | None:
        """Claim again a fenced partition the group has left here a session long (reclaim.py),
        once the group confirms it assigns it here; else ask again a session later. This
        member's standing, if the group was asked."""
        now = time.monotonic()
        due = self._fenced.due(consumer.assignment(), now)
        if not due:
            return None
        seen = self._ownership.standing(consumer, self.settings.topics.input)
        given_here = seen.partitions if seen is not None else frozenset()
        for partition in self._fenced.confirmed(due, given_here, now):
            self.metrics.errors.labels(kind="partition_reclaimed").inc()
            log.warning(
                "claiming again a fenced partition still assigned here",
                partition=partition.partition,
            )
            self._to_inference.put(Claim(partition))
        return seen

    def _dropped(self, seen: Standing | None) -> bool:
        """Whether the group has dropped this member unnoticed (membership.py)."""
        return self._membership.dropped(seen, time.monotonic())

    def _join_anew(self, consumer: KafkaConsumer) -> KafkaConsumer:
        """Replace a consumer the group dropped unnoticed by a new member; its partitions are
        dropped as lost. The old one, if the worker stops before a new one connects."""
        try:
            fresh = self._new_consumer()
        except Unreachable:  # stopping
            return consumer
        held = retire(consumer)
        self.metrics.errors.labels(kind="membership_dropped").inc()
        log.warning(
            "the group dropped this member unnoticed: joining it again with a new consumer",
            partitions=sorted(p.partition for p in held),
        )
        if held:
            self.on_lost(held)
        return fresh

    def _start_claimed(self, consumer: KafkaConsumer) -> None:
        """Seek each claimed partition to where its committed state stops, then let it flow;
        one whose committed offset Kafka cannot tell now is tried again next time."""
        for partition, ready in list(self._unstarted.items()):
            if partition in consumer.assignment():
                ask = partial(consumer.committed, partition, timeout_ms=PROBE_TIMEOUT_MS)
                try:
                    committed = self._outages.call(KAFKA, "claim", ask)
                except Unreachable:
                    return
                self._start_consuming(consumer, ready, committed)
            del self._unstarted[partition]

    def _start_consuming(
        self, consumer: KafkaConsumer, ready: Ready, committed: int | None
    ) -> None:
        partition = ready.partition
        if ready.next_offset is None:
            self._applied.pop(partition, None)
        else:
            self._applied[partition] = ready.next_offset
        seek = decide_seek(ready.next_offset, committed, self.settings.group.on_state_loss)
        if seek.states_lost:
            self.metrics.errors.labels(kind="state_behind_kafka").inc()
            log.error(
                "Redis is behind Kafka's committed offset: states were lost",
                partition=partition.partition,
                redis_offset=ready.next_offset,
                kafka_offset=committed,
                policy=str(self.settings.group.on_state_loss),
            )
        if seek.offset is None:
            consumer.seek_to_beginning(partition)
        else:
            consumer.seek(partition, seek.offset)
        self._gate.open(consumer, partition)

    def _report_lag(self, consumer: KafkaConsumer) -> None:
        """Lag from what the inference thread reported applied, never from its own state."""
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            applied = self._applied.get(partition)
            if highwater is not None and applied is not None:
                lag = max(0, highwater - applied)
                self.metrics.consumer_lag.labels(partition=str(partition.partition)).set(lag)

    # The rebalance listener (kafka-python's IO thread) ----------------------------------------

    # Only queues and flags here: calling into the consumer from its own IO thread can
    # deadlock with the polling thread, which holds the consumer's locks while it waits;
    # and nothing here may wait, or the heartbeats wait with it.
    def on_assigned(self, added: set[TopicPartition]) -> None:
        self.health.group_joined = True
        log.info("group joined", added=sorted(p.partition for p in added))
        for partition in sorted(added):
            log.info("partition assigned", partition=partition.partition)
            self._to_inference.put(Claim(partition))

    def on_revoked(self, revoked: set[TopicPartition]) -> Handoff | None:
        """Hand the revoke to the inference thread; the listener awaits the handoff."""
        if self._closing or not revoked:
            return None  # closing: everything was checkpointed already
        log.info("partitions revoked", partitions=sorted(p.partition for p in revoked))
        self._gate.close(revoked)
        handoff = Handoff(self.settings.group.shutdown_seconds)
        self._to_inference.put(Revoke(frozenset(revoked), handoff))
        return handoff

    def on_lost(self, lost: set[TopicPartition]) -> None:
        log.warning("partitions lost", partitions=sorted(p.partition for p in lost))
        self._gate.close(lost)
        self._to_inference.put(Lost(frozenset(lost)))


def _missing_topics(missing: dict[str, str]) -> str:
    """Which of the worker's topics (name by role) are missing, and what to do about it."""
    named = ", ".join(f"{role} topic {name!r}" for role, name in missing.items())
    one = len(missing) == 1
    return (
        f"{named} {'does' if one else 'do'} not exist (or {'is' if one else 'are'} not visible "
        f"to this worker); create {'it' if one else 'them'} with `streamsink topics create`"
    )
