"""Session-wide real services (one Kafka broker, one Redis server, and a three-node Redis
Cluster, started once for the tests that ask for it) for all integration tests, per-test
clusters on them, and the reference run the worker scenarios compare with."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.cluster import Cluster
from tests.integration.services import KafkaService, RedisClusterService, RedisService
from tests.integration.worker_harness import EXPECTED


def _running(service):
    """The service started for the session, and stopped after it."""
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def kafka_service(tmp_path_factory) -> Iterator[KafkaService]:
    yield from _running(KafkaService(tmp_path_factory.mktemp("kafka")))


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory) -> Iterator[RedisService]:
    yield from _running(RedisService(tmp_path_factory.mktemp("redis")))


@pytest.fixture(scope="session")
def redis_cluster_service(tmp_path_factory) -> Iterator[RedisClusterService]:
    yield from _running(RedisClusterService(tmp_path_factory.mktemp("redis-cluster")))


@pytest.fixture
def cluster(kafka_service, redis_service, tmp_path):
    clusters: list[Cluster] = []

    def make(label: str) -> Cluster:
        clusters.append(Cluster(label, kafka_service, redis_service, tmp_path))
        return clusters[-1]

    yield make
    for c in clusters:
        c.close()


@pytest.fixture(scope="session")
def reference(kafka_service, redis_service, tmp_path_factory) -> dict[tuple[str, int], str]:
    """(stream, seq) -> text from one worker that ran from start to end without moving."""
    c = Cluster("reference", kafka_service, redis_service, tmp_path_factory.mktemp("ref"))
    try:
        c.produce()
        worker = c.worker("only")
        records = c.wait_for(EXPECTED)
        assert worker.terminate() == 0
    finally:
        c.close()
    texts = {(r["stream_id"], r["seq"]): r["text"] for r in records}
    assert set(texts) == EXPECTED and all(texts.values())
    return texts
