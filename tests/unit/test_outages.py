"""Waiting out an outage: counted, logged, shown on /readyz, retried with a backoff."""

from __future__ import annotations

import threading
import time

import pytest
from kafka.errors import KafkaConfigurationError, KafkaConnectionError, KafkaTimeoutError

import worker.runtime.outages as outages_module
from cache_store.memory_partition import MemoryPartitionStore
from cache_store.partition import StoreRefusedError, StoreUnavailableError
from worker.io.kafka_connection import KafkaConnection
from worker.ops.health import Health
from worker.ops.metrics import WorkerMetrics
from worker.runtime.kafka_run import KafkaWorker
from worker.runtime.kafka_settings import WorkerSettings
from worker.runtime.outages import KAFKA, REDIS, Outages, Unreachable


@pytest.fixture
def outages(monkeypatch) -> Outages:
    monkeypatch.setattr(outages_module, "FIRST_DELAY_SECONDS", 0.001)
    health = Health()
    health.model_loaded = health.group_joined = True
    return Outages(health, WorkerMetrics())


def _failing(*errors: Exception):
    """A call that raises each of `errors` in turn, then answers "ok"."""
    pending = list(errors)

    def call() -> str:
        if pending:
            raise pending.pop(0)
        return "ok"

    return call


def test_a_failure_cuts_the_service_off_until_a_call_reaches_it(outages) -> None:
    with pytest.raises(Unreachable, match="Kafka is unreachable"):
        outages.call(KAFKA, "poll", _failing(KafkaConnectionError("111 ECONNREFUSED")))
    assert outages.health.not_ready_because() == "cut off from Kafka"
    assert outages.metrics.value("streamsink_errors", kind="kafka_unavailable") == 1
    assert outages.call(KAFKA, "poll", lambda: {}, proves_contact=False) == {}
    assert outages.health.not_ready_because() == "cut off from Kafka"  # a poll proves nothing
    assert outages.call(KAFKA, "probe", lambda: 7) == 7
    assert outages.health.not_ready_because() is None


def test_wait_for_retries_until_the_service_answers(outages) -> None:
    down = _failing(StoreUnavailableError("down"), StoreUnavailableError("still down"))
    assert outages.wait_for(REDIS, "connect", down) == "ok"
    assert outages.metrics.value("streamsink_errors", kind="redis_unavailable") == 2
    assert outages.health.not_ready_because() is None


def test_wait_for_gives_up_once_the_worker_stops(outages) -> None:
    outages.stop.set()
    with pytest.raises(Unreachable):
        outages.wait_for(KAFKA, "connect", _failing(*[KafkaTimeoutError("bootstrap")] * 3))


@pytest.mark.parametrize(
    ("service", "error"),
    [
        (KAFKA, KafkaConfigurationError("a bad setting")),
        (REDIS, StoreRefusedError("Redis refused the credentials")),
    ],
)
def test_what_waiting_cannot_fix_is_raised(outages, service: str, error: Exception) -> None:
    with pytest.raises(type(error)):
        outages.wait_for(service, "connect", _failing(error))
    assert outages.health.not_ready_because() is None


def test_a_worker_waits_for_redis_as_it_starts_and_stops_cleanly_meanwhile(outages) -> None:
    store = MemoryPartitionStore()
    store.available = False
    health = outages.health
    worker = KafkaWorker(
        None, KafkaConnection("127.0.0.1:9"), store, WorkerSettings(), WorkerMetrics(), health
    )
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 10
    while health.not_ready_because() != "cut off from Redis" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health.not_ready_because() == "cut off from Redis" and thread.is_alive()
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


class _Brokers:
    """The one consumer call the probe makes, answered as a reachable broker would."""

    def end_offsets(self, partitions, timeout_ms):
        return {}


def test_a_redis_gone_mid_run_shows_on_readyz_until_it_answers_again(outages) -> None:
    store = MemoryPartitionStore()
    worker = KafkaWorker(
        None, KafkaConnection("127.0.0.1:9"), store, WorkerSettings(), outages.metrics,
        outages.health,
    )  # fmt: skip
    worker._outages = outages
    store.available = False
    worker._probe(_Brokers())
    assert outages.health.not_ready_because() == "cut off from Redis"
    store.available = True
    worker._next_probe = 0.0
    worker._probe(_Brokers())
    assert outages.health.not_ready_because() is None
