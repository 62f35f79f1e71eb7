"""Outages under real `streamsink run` workers: one that starts while the broker is down, one
whose broker goes away mid-run for longer than a session, one whose Redis goes away mid-run.
Each worker stays up, says it is not ready while cut off, and its commentary matches the
uninterrupted run's."""

from __future__ import annotations

import time

import pytest

from tests.http_probe import scrape
from tests.integration.cluster import check_against, metrics_port, sample
from tests.integration.worker_harness import EXPECTED, STREAMS, Worker

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

CUT_OFF = (503, "cut off from Kafka\n")
CUT_OFF_REDIS = (503, "cut off from Redis\n")
SESSION_SECONDS = 6  # the harness's --session-timeout-ms


def _ready(worker: Worker, port: int) -> None:
    worker.wait_for(lambda _: scrape(port, "/readyz")[0] == 200, "readiness", timeout=240)


def _waited_out(worker: Worker, port: int, service: str = "kafka") -> None:
    """The worker counted the outage, and is still up."""
    errors = sample(
        scrape(port, "/metrics")[1], f'streamsink_errors_total{{kind="{service}_unavailable"}}'
    )
    assert errors > 0 and worker.process.poll() is None


def test_a_worker_started_while_the_broker_is_down_waits_for_it(cluster, reference, kafka_service):
    c = cluster("coldstart")
    c.produce()
    kafka_service.stop()
    try:
        worker = c.worker("one")
        port = metrics_port(worker)
        worker.wait_for(lambda _: scrape(port, "/readyz") == CUT_OFF, "not ready", timeout=240)
        time.sleep(SESSION_SECONDS)
        assert worker.process.poll() is None and scrape(port, "/readyz") == CUT_OFF
    finally:
        kafka_service.start()
    records = c.wait_for(EXPECTED)
    _ready(worker, port)
    _waited_out(worker, port)
    assert worker.terminate() == 0
    check_against(reference, records)


def test_a_broker_gone_mid_run_for_longer_than_a_session_is_waited_out(
    cluster, reference, kafka_service
):
    c = cluster("outage")
    c.produce(slice(0, 8))
    worker = c.worker("one")
    port = metrics_port(worker)
    c.wait_for({(stream, 0) for stream in STREAMS})
    _ready(worker, port)
    kafka_service.stop()
    try:
        worker.wait_for(lambda _: scrape(port, "/readyz") == CUT_OFF, "not ready", timeout=60)
        time.sleep(2 * SESSION_SECONDS)  # the group forgets the worker meanwhile
        assert worker.process.poll() is None and scrape(port, "/readyz") == CUT_OFF
    finally:
        kafka_service.start()
    c.produce(slice(8, None))
    records = c.wait_for(EXPECTED)
    _ready(worker, port)
    _waited_out(worker, port)
    assert worker.terminate() == 0
    check_against(reference, records)


def test_a_redis_gone_mid_run_is_shown_on_readyz_and_waited_out(cluster, reference, redis_service):
    c = cluster("redis-outage")
    c.produce(slice(0, 8))
    worker = c.worker("one")
    port = metrics_port(worker)
    c.wait_for({(stream, 0) for stream in STREAMS})
    _ready(worker, port)
    redis_service.stop()
    try:  # shown once the store's own retries (about 30 s) gave up
        worker.wait_for(lambda _: scrape(port, "/readyz") == CUT_OFF_REDIS, "not ready", 120)
        assert worker.process.poll() is None
    finally:
        redis_service.start()
    c.produce(slice(8, None))
    records = c.wait_for(EXPECTED)
    _ready(worker, port)
    _waited_out(worker, port, "redis")
    assert worker.terminate() == 0
    check_against(reference, records)
