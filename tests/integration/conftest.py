"""Session-wide real services: one Kafka broker and one Redis server for all integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.services import KafkaService, RedisService


@pytest.fixture(scope="session")
def kafka_service(tmp_path_factory) -> Iterator[KafkaService]:
    service = KafkaService(tmp_path_factory.mktemp("kafka"))
    service.start()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory) -> Iterator[RedisService]:
    service = RedisService(tmp_path_factory.mktemp("redis"))
    service.start()
    yield service
    service.stop()
