"""The metrics and health endpoints over real HTTP."""

from __future__ import annotations

import time

import pytest

from tests.http_probe import scrape
from worker.ops.health import Health, serve
from worker.ops.metrics import WorkerMetrics


@pytest.fixture
def served():
    metrics, health = WorkerMetrics(), Health(stall_seconds=0.2)
    server = serve(metrics, health, host="127.0.0.1", port=0)
    yield metrics, health, server.port
    server.close()


def test_ready_only_once_the_model_is_loaded_and_the_group_joined(served) -> None:
    _, health, port = served
    assert scrape(port, "/readyz") == (503, "model not loaded\n")
    health.model_loaded = True
    assert scrape(port, "/readyz") == (503, "consumer group not joined\n")
    health.group_joined = True
    assert scrape(port, "/readyz") == (200, "ready\n")


def test_not_ready_while_cut_off_from_a_service_and_ready_again_after(served) -> None:
    _, health, port = served
    health.model_loaded = health.group_joined = True
    health.cut_off("Kafka")
    health.cut_off("Redis")
    assert scrape(port, "/readyz") == (503, "cut off from Kafka and Redis\n")
    assert health.reconnected("Kafka") and not health.reconnected("Kafka")
    assert scrape(port, "/readyz") == (503, "cut off from Redis\n")
    health.reconnected("Redis")
    assert scrape(port, "/readyz") == (200, "ready\n")


def test_alive_until_the_loop_stalls(served) -> None:
    _, health, port = served
    assert scrape(port, "/healthz")[0] == 200  # not started yet: still loading is alive
    health.beat()
    assert scrape(port, "/healthz")[0] == 200
    time.sleep(0.3)
    assert scrape(port, "/healthz") == (503, "run loop stalled\n")
    assert scrape(port, "/nope")[0] == 404


def test_metrics_text_shows_counters_moving(served) -> None:
    metrics, _, port = served
    metrics.records.inc(3)
    metrics.dead_letters.labels(reason="invalid_utf8").inc()
    metrics.consumer_lag.labels(partition="2").set(17)
    metrics.checkpoint_seconds.observe(0.02)
    status, text = scrape(port, "/metrics")
    assert status == 200
    assert "streamsink_records_total 3.0" in text
    assert 'streamsink_dead_letter_records_total{reason="invalid_utf8"} 1.0' in text
    metrics.records.inc(2)
    assert "streamsink_records_total 5.0" in scrape(port, "/metrics")[1]
    assert metrics.value("streamsink_records") == 5
    assert metrics.value("streamsink_consumer_lag_records", partition="2") == 17
    assert metrics.value("streamsink_checkpoint_seconds_count") == 1
    assert metrics.value("streamsink_dead_letter_records", reason="too_large") == 0
