"""A worker's start against the real broker: it waits a while for its topics, and a topic
still missing then is a clear error naming it, not a producer blocked on its metadata."""

from __future__ import annotations

import threading
import uuid

import pytest
from kafka.admin import KafkaAdminClient, NewTopic
from structlog.testing import capture_logs

from cache_store.memory_partition import MemoryPartitionStore
from tests.integration.worker_harness import create_topics
from worker.exceptions import StreamsinkError
from worker.io.kafka_connection import KafkaConnection
from worker.io.topics import TopicNames
from worker.ops.health import Health
from worker.ops.metrics import WorkerMetrics
from worker.runtime import kafka_run
from worker.runtime.kafka_run import KafkaWorker
from worker.runtime.kafka_settings import GroupSettings, WorkerSettings
from worker.runtime.membership import retire


def _worker(bootstrap: str, topics: TopicNames) -> KafkaWorker:
    settings = WorkerSettings(topics, GroupSettings(f"group-{uuid.uuid4().hex[:8]}"))
    return KafkaWorker(
        None, KafkaConnection(bootstrap), MemoryPartitionStore(), settings, WorkerMetrics(),
        Health(),
    )  # fmt: skip


def test_a_missing_output_topic_is_named_once_the_wait_is_over(kafka_service, monkeypatch):
    monkeypatch.setattr(kafka_run, "TOPIC_WAIT_SECONDS", 3.0)
    made = create_topics(kafka_service.bootstrap, f"start-{uuid.uuid4().hex[:8]}")
    missing = f"{made.output}-nowhere"
    worker = _worker(kafka_service.bootstrap, TopicNames(made.input, missing, made.dead_letter))
    with capture_logs() as logs, pytest.raises(StreamsinkError) as raised:
        worker.run(threading.Event())
    assert str(raised.value) == (
        f"output topic {missing!r} does not exist (or is not visible to this worker); "
        "create it with `streamsink topics create`"
    )
    waits = [entry for entry in logs if entry["event"] == "waiting for topics to be created"]
    assert [entry["topics"] for entry in waits] == [[missing]]


def test_a_topic_created_while_the_worker_waits_lets_it_start(kafka_service) -> None:
    made = create_topics(kafka_service.bootstrap, f"start-{uuid.uuid4().hex[:8]}")
    late = f"{made.output}-late"
    worker = _worker(kafka_service.bootstrap, TopicNames(made.input, late, made.dead_letter))
    admin = KafkaAdminClient(bootstrap_servers=kafka_service.bootstrap)
    creating = threading.Timer(2.0, admin.create_topics, [[NewTopic(late, 2, 1)]])
    creating.start()
    try:
        consumer = worker._connect()
        assert sorted(partition.partition for partition in worker._partitions) == [0, 1, 2, 3]
        assert worker.producer.producer.partitions_for(late) == {0, 1}
        retire(consumer)
    finally:
        creating.join()
        admin.close()
        worker.producer.close()
        worker._ownership.close()
