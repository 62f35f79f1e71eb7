"""The output producer against the real broker: dead letters read back by their source."""

from __future__ import annotations

import time
import uuid

from tests.integration.worker_harness import create_topics
from worker.io.kafka_connection import KafkaConnection
from worker.io.kafka_output import OutputProducer


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
        producer.send_dead_letter(None, b"\xff first", [("streamsink.source", b"in/0@1")])
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
