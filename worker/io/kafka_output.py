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

import structlog
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.producer.future import FutureRecordMetadata

from worker.exceptions import BadRecordError
from worker.io.kafka_connection import KafkaConnection
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
    """One thread's sends since its last flush (partitions deliver from more than one)."""

    def __init__(self) -> None:
        self.futures: list[FutureRecordMetadata] = []


LINGER_MS = 5
REQUEST_TIMEOUT_MS = 30_000  # kafka-python's default


class OutputProducer:
    """Commentary and dead letters out, idempotent and acknowledged by all in-sync replicas.

    It reaches the brokers on `connect`, not when made: a worker that starts while they are
    down waits for them (worker/runtime/outages.py) instead of failing to start.

    A record the brokers have not taken within `expiry_ms` (the group's session timeout) is
    dropped, its flush failing, never sent later: a worker stopped that long (a SIGSTOP, a
    stalled node) may have lost its partition meanwhile, and the new owner re-sends the
    partition's outbox itself, so the late copy would be a second one. For the same reason a
    send never waits on the brokers: the topics' metadata is fetched on `connect`, and a send
    that must still wait for it gives up after `expiry_ms` (a record made only once the
    brokers answer would be new, and no expiry would stop it).
    """

    def __init__(
        self,
        connection: KafkaConnection,
        output_topic: str,
        dead_letter_topic: str | None,
        expiry_ms: int = 120_000,
    ) -> None:
        self.connection = connection
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.expiry_ms = expiry_ms
        self._producer: KafkaProducer | None = None
        self._sent = _Sends()

    def connect(self, bootstrap_timeout_ms: int) -> None:
        """Reach the brokers; KafkaTimeoutError if none answers in `bootstrap_timeout_ms`."""
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
        for topic in filter(None, (self.output_topic, self.dead_letter_topic)):
            try:
                self._producer.partitions_for(topic)
            except KafkaTimeoutError:
                log.warning("output topic not found yet", topic=topic)

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            raise RuntimeError("OutputProducer.connect() was not called")
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
        self.producer.flush(timeout=timeout)
        sent, self._sent.futures = self._sent.futures, []
        for future in sent:
            if future.failed():
                raise future.exception

    def settle(self, timeout: float | None = None) -> None:
        """Wait until every record sent before is taken or given up, and forget how each ended:
        after a failed flush they are in doubt, and what is on the topics tells. Raises
        KafkaTimeoutError if the wait runs out (they may still land)."""
        self.producer.flush(timeout=timeout)
        self._sent.futures = []

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
        self._sent.futures.append(future)

    def close(self, timeout: float = 10.0) -> None:
        if self._producer is not None:
            self._producer.close(timeout=timeout)


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
