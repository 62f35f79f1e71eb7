"""The output producer against the real broker: dead letters read back by their source."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka.errors import KafkaTimeoutError

from tests.integration.worker_harness import create_topics, read_topic
from worker.io.kafka_connection import KafkaConnection
from worker.io.kafka_output import SOURCE_HEADER, STALLED_SECONDS, OutputProducer
from worker.ops.metrics import WorkerMetrics


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_dead_letters_on_the_topic_are_read_back_by_source_from_a_time_on(kafka_service) -> None:
    topics = create_topics(kafka_service.bootstrap, f"readback-{uuid.uuid4().hex[:8]}")
    producer = OutputProducer(
        KafkaConnection(kafka_service.bootstrap), topics.output, topics.dead_letter
    )
    producer.connect(bootstrap_timeout_ms=30_000)
    try:
        assert producer.dead_letters_since(0, timeout=30) == set()  # an empty topic
        producer.send_dead_letter(None, b"\xff first", [(SOURCE_HEADER, b"in/0@1")])
        producer.flush(timeout=30)
        time.sleep(0.05)
        between = _now_ms()
        time.sleep(0.05)
        producer.send_dead_letter("svc", b"second", [("streamsink.source", b"in/3@7")])
        producer.send_commentary("svc", b'{"text": "not a dead letter"}')
        producer.settle(timeout=30)
        assert producer.dead_letters_since(0, timeout=30) == {b"in/0@1", b"in/3@7"}
        assert producer.dead_letters_since(between, timeout=30) == {b"in/3@7"}
        assert producer.dead_letters_since(_now_ms() + 60_000, timeout=30) == set()
    finally:
        producer.close()


def test_a_producer_that_stopped_sending_is_replaced_and_sends_again(kafka_service) -> None:
    topics = create_topics(kafka_service.bootstrap, f"stopped-{uuid.uuid4().hex[:8]}")
    producer = OutputProducer(
        KafkaConnection(kafka_service.bootstrap),
        topics.output,
        topics.dead_letter,
        expiry_ms=2000,
        metrics=(metrics := WorkerMetrics()),
    )
    producer.connect(bootstrap_timeout_ms=30_000)
    try:
        producer.send_commentary("svc", b'{"text": "before"}')
        producer.flush(timeout=30)
        stopped = producer.producer
        # The fault: kafka-python drops its producer id, as it does when a retried batch
        # expires, and never asks for another.
        stopped._transaction_manager.reset_producer_id()
        producer.send_dead_letter(None, b"bad", [(SOURCE_HEADER, b"in/0@1")])
        with pytest.raises(KafkaTimeoutError):
            producer.flush(timeout=1)  # pending, but not yet past its expiry: kept
        assert producer.producer is stopped
        with pytest.raises(KafkaTimeoutError):
            producer.settle(timeout=STALLED_SECONDS + 3)  # past it: the producer stopped
        assert metrics.value("streamsink_errors", kind="producer_stopped") == 1
        stopped._sender.join(30)
        assert not stopped._sender.is_alive()
        producer.settle(timeout=30)
        assert producer.producer is not stopped
        assert producer.dead_letters_since(0, timeout=30) == set()  # never sent, nor later
        producer.send_dead_letter(None, b"bad", [(SOURCE_HEADER, b"in/0@1")])
        producer.flush(timeout=30)
        letters = read_topic(kafka_service.bootstrap, topics.dead_letter)
        assert [letter.value for letter in letters] == [b"bad"]
    finally:
        producer.close()
