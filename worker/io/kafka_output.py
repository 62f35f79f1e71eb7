"""Kafka records in and out: input record conversion, commentary and dead letters produced.

Output records are keyed by stream id, so a stream's commentary keeps its order on the output
topic. Dead letters keep the original key and bytes, with the reason in headers, so nothing
set aside is lost and a fixed record can be replayed from there. Both are produced only once
committed, from the partition's outbox (worker/runtime/partition_checkpointer.py); a dead
letter that may have been sent already is looked up on its topic, by its source, before it is
sent again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from contextlib import suppress

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.producer.future import FutureRecordMetadata

from worker.exceptions import BadRecordError
from worker.io.kafka_connection import KafkaConnection
from worker.ops.metrics import WorkerMetrics
from worker.stream.records import Commentary, Record

log = structlog.get_logger("streamsink.worker")

SOURCE_HEADER = "streamsink.source"  # where a dead letter came from: its identity


def to_record(message: ConsumerRecord) -> Record:
    """An input record as the processor sees it; a key that is not UTF-8 counts as no key."""
    try:
        stream_id = None if message.key is None else message.key.decode("utf-8")
    except UnicodeDecodeError:
        stream_id = None
    return Record(stream_id, message.offset, message.value or b"", message.partition)


def dead_letter_headers(
    topic: str, record: Record, error: BadRecordError
) -> list[tuple[str, bytes]]:
    """Why a record was set aside, and where it came from (topic/partition@offset)."""
    return [
        ("streamsink.reason", error.reason.encode()),
        ("streamsink.error", str(error).encode()),
        (SOURCE_HEADER, f"{topic}/{record.partition}@{record.offset}".encode()),
    ]


def dead_letter_source(headers: Sequence[tuple[str, bytes]]) -> bytes | None:
    return dict(headers).get(SOURCE_HEADER)


def commentary_payload(commentary: Commentary) -> bytes:
    """The output record's value: the JSON consumers read (stream id, seq, offsets, text...)."""
    return json.dumps(commentary.to_json_dict(), ensure_ascii=False).encode()


class _Sends(threading.local):
    """One thread's sends since its last flush (partitions deliver from more than one), each
    with the time it was made."""

    def __init__(self) -> None:
        self.futures: list[tuple[FutureRecordMetadata, float]] = []


LINGER_MS = 5
REQUEST_TIMEOUT_MS = 30_000  # kafka-python's default
STALLED_SECONDS = 5.0  # past its expiry, a send still pending means the producer stopped


class OutputProducer:
    """Commentary and dead letters out, idempotent and acknowledged by all in-sync replicas.

    It reaches the brokers on `connect`, not when made: a worker that starts while they are
    down waits for them (worker/runtime/outages.py) instead of failing to start.

    A record the brokers have not taken within `expiry_ms` (the group's session timeout) is
    dropped, its flush failing, never sent later: a worker stopped that long (a SIGSTOP, a
    stalled node) may have lost its partition meanwhile, and the new owner re-sends the
    partition's outbox itself, so the late copy would be a second one. For the same reason a
    send never waits on the brokers: the topics' metadata is fetched once they are known to
    exist (`learn_topics`, and again by each replacement on `connect`), and a send that must
    still wait for it gives up after `expiry_ms` (a record made only once the brokers answer
    would be new, and no expiry would stop it).

    kafka-python 3.0.12's idempotent producer can stop for good: once a batch it had retried
    expires, it drops its producer id and never asks for another (its state stays READY), so it
    neither sends nor expires anything again. A flush that finds a send pending past its
    expiry replaces such a producer (its sends fail, never to be sent later) and raises; what
    they carried is in doubt, as after any failed flush, and is sent again by the new one.
    """

    def __init__(
        self,
        connection: KafkaConnection,
        output_topic: str,
        dead_letter_topic: str | None,
        expiry_ms: int = 120_000,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.connection, self.metrics = connection, metrics
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.expiry_ms = expiry_ms
        self._producer: KafkaProducer | None = None
        self._bootstrap_timeout_ms: int | None = None  # once connected: a replacement's
        self._topics_known = False  # once they are: a replacement learns them as it connects
        self._sent = _Sends()

    def connect(self, bootstrap_timeout_ms: int) -> None:
        """Reach the brokers; KafkaTimeoutError if none answers in `bootstrap_timeout_ms`."""
        self._bootstrap_timeout_ms = bootstrap_timeout_ms
        self._producer = KafkaProducer(
            **self.connection.client_config(),
            acks="all",
            enable_idempotence=True,
            linger_ms=LINGER_MS,
            delivery_timeout_ms=self.expiry_ms,
            # kafka-python wants a request to time out before the record expires
            request_timeout_ms=min(REQUEST_TIMEOUT_MS, self.expiry_ms - LINGER_MS - 1),
            bootstrap_timeout_ms=bootstrap_timeout_ms,
            max_block_ms=self.expiry_ms,
        )
        if self._topics_known:
            self.learn_topics()

    def learn_topics(self) -> None:
        """Fetch the output topics' metadata, so no send waits for it. Only once they exist:
        a look for a missing topic blocks for `expiry_ms`, logging an error at every retry."""
        assert self._producer is not None, "OutputProducer.connect() was not called"
        self._topics_known = True
        for topic in filter(None, (self.output_topic, self.dead_letter_topic)):
            try:
                self._producer.partitions_for(topic)
            except KafkaTimeoutError:
                log.warning("output topic metadata not fetched yet", topic=topic)

    @property
    def producer(self) -> KafkaProducer:
        """The producer; a replacement for a stopped one is connected on first use."""
        if self._producer is None:
            if self._bootstrap_timeout_ms is None:
                raise RuntimeError("OutputProducer.connect() was not called")
            self.connect(self._bootstrap_timeout_ms)
        assert self._producer is not None
        return self._producer

    def send_commentary(self, stream_id: str, payload: bytes) -> None:
        self._track(self.producer.send(self.output_topic, key=stream_id.encode(), value=payload))

    def send_dead_letter(
        self, key: str | None, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        """Forward a record set aside; without a dead-letter topic it is only logged."""
        if self.dead_letter_topic is None:
            return
        sent = self.producer.send(
            self.dead_letter_topic,
            key=None if key is None else key.encode(),
            value=value,
            headers=list(headers),
        )
        self._track(sent)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything this thread sent is acknowledged; raises KafkaTimeoutError if
        the wait runs out, or the error of a record the producer gave up on (expired, or out
        of retries): kafka-python's flush returns once every record is done, taken or not."""
        self._await(timeout)
        sent, self._sent.futures = self._sent.futures, []
        for future, _ in sent:
            if future.failed():
                raise future.exception

    def settle(self, timeout: float | None = None) -> None:
        """Wait until every record sent before is taken or given up, and forget how each ended:
        after a failed flush they are in doubt, and what is on the topics tells. Raises
        KafkaTimeoutError if the wait runs out (they may still land)."""
        self._await(timeout)
        self._sent.futures = []

    def _await(self, timeout: float | None) -> None:
        """The producer's flush; one that runs out with a send pending past its expiry
        replaces the producer, which has stopped (see the class), before it raises."""
        try:
            self.producer.flush(timeout=timeout)
        except KafkaTimeoutError:
            limit = time.monotonic() - self.expiry_ms / 1000 - STALLED_SECONDS
            if any(not future.is_done and made < limit for future, made in self._sent.futures):
                self._replace_stopped()
            raise

    def _replace_stopped(self) -> None:
        stopped, self._producer = self._producer, None
        if self.metrics is not None:
            self.metrics.errors.labels(kind="producer_stopped").inc()
        log.error(
            "the output producer stopped sending: replaced",
            pending=sum(not future.is_done for future, _ in self._sent.futures),
        )
        self._sent.futures = []  # failed below; what they carried is in doubt
        if stopped is not None:
            _drop(stopped, timeout=self.expiry_ms / 1000)

    def dead_letters_since(self, since_ms: int, timeout: float) -> set[bytes]:
        """The sources of the dead letters on the topic stamped `since_ms` or later; raises
        KafkaError if they cannot all be read within `timeout` seconds."""
        if self.dead_letter_topic is None:
            return set()
        reader = KafkaConsumer(
            **self.connection.client_config(),
            group_id=None,
            enable_auto_commit=False,
            bootstrap_timeout_ms=int(timeout * 1000),
        )
        try:
            return _sources_since(reader, self.dead_letter_topic, since_ms, timeout)
        finally:
            reader.close()

    def _track(self, future: FutureRecordMetadata) -> None:
        self._sent.futures.append((future, time.monotonic()))

    def close(self, timeout: float = 10.0) -> None:
        """Flush and close; sends still pending after `timeout` are dropped."""
        if self._producer is not None:
            try:
                self._producer.close(timeout=timeout)
            except KafkaTimeoutError:
                _drop(self._producer, timeout=0)


def _drop(producer: KafkaProducer, timeout: float) -> None:
    """Close `producer` without waiting for its pending sends: they fail, and are never sent
    later. (Its close() flushes first, which a stopped producer never finishes.)"""
    producer._sender.force_close()
    with suppress(KafkaError):
        producer.close(timeout=timeout)


def _sources_since(reader: KafkaConsumer, topic: str, since_ms: int, timeout: float) -> set[bytes]:
    """Read every partition of `topic` from the first record stamped `since_ms` or later to
    the end it had when asked."""
    deadline = time.monotonic() + timeout
    numbers = reader.partitions_for_topic(topic)
    if not numbers:  # unknown while the brokers are away: no proof that nothing is there
        raise KafkaTimeoutError(f"the partitions of {topic} are not known")
    partitions = [TopicPartition(topic, number) for number in numbers]
    reader.assign(partitions)
    ends = reader.end_offsets(partitions)
    starts = reader.offsets_for_times(dict.fromkeys(partitions, since_ms))
    left = {tp for tp, start in starts.items() if start is not None and start.offset < ends[tp]}
    for tp in left:
        reader.seek(tp, starts[tp].offset)
    sources: set[bytes] = set()
    while left := {tp for tp in left if reader.position(tp) < ends[tp]}:
        if time.monotonic() > deadline:
            raise KafkaTimeoutError(f"{topic} not read back within {timeout:g} s")
        for records in reader.poll(timeout_ms=200).values():
            sources.update(filter(None, (dead_letter_source(r.headers) for r in records)))
    return sources
