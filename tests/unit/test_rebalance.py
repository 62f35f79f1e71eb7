"""The rebalance listener on kafka-python's own event loop: a revoke is awaited while the loop
goes on (the loop sends the heartbeats), and the wait is bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from kafka import TopicPartition
from kafka.coordinator.consumer import ConsumerCoordinator
from kafka.net.selector import NetworkSelector
from structlog.testing import capture_logs

from cache_store.memory_partition import MemoryPartitionStore
from worker.io.kafka_connection import KafkaConnection
from worker.ops.health import Health
from worker.ops.metrics import WorkerMetrics
from worker.runtime.kafka_run import KafkaWorker
from worker.runtime.kafka_settings import GroupSettings, WorkerSettings
from worker.runtime.rebalance import RebalanceListener

REVOKED = {TopicPartition("in", 0)}
TICK_SECONDS = 0.02


@contextmanager
def event_loop() -> Iterator[tuple[NetworkSelector, list[float]]]:
    """kafka-python's loop on its IO thread, with a task that ticks like a heartbeat."""
    net, ticks, running = NetworkSelector(), [], [True]

    async def tick() -> None:
        while running[0]:
            ticks.append(time.monotonic())
            await net.sleep(TICK_SECONDS)

    net.start()
    net.call_soon_threadsafe(tick)
    try:
        yield net, ticks
    finally:
        running[0] = False
        net.stop(timeout_ms=2000)
        net.close()


def _revoke(net: NetworkSelector, worker: KafkaWorker) -> None:
    """Call the listener on the loop as kafka-python's coordinator does after a rebalance."""
    coordinator = SimpleNamespace(
        _subscription=SimpleNamespace(rebalance_listener=RebalanceListener(worker)),
        group_id="group",
        _REBALANCE_LISTENER_WARN_SECS=ConsumerCoordinator._REBALANCE_LISTENER_WARN_SECS,
    )
    net.run(
        ConsumerCoordinator._invoke_rebalance_listener_async,
        coordinator,
        "on_partitions_revoked",
        REVOKED,
    )


def _worker(shutdown_seconds: float) -> KafkaWorker:
    settings = WorkerSettings(group=GroupSettings(shutdown_seconds=shutdown_seconds))
    store = MemoryPartitionStore()
    connection = KafkaConnection("127.0.0.1:9")
    return KafkaWorker(None, connection, store, settings, WorkerMetrics(), Health())


def _checkpoint_after(worker: KafkaWorker, seconds: float) -> threading.Thread:
    """The inference thread's part: take the revoke, take `seconds`, say it is done."""

    def finish() -> None:
        revoke = worker.inference.inbox.get(timeout=5)
        time.sleep(seconds)
        revoke.done.set()

    thread = threading.Thread(target=finish)
    thread.start()
    return thread


def test_a_revoke_is_awaited_while_the_loop_goes_on_heartbeating() -> None:
    worker = _worker(shutdown_seconds=10)
    with event_loop() as (net, ticks):
        inference = _checkpoint_after(worker, 0.5)
        started = time.monotonic()
        _revoke(net, worker)
        waited = time.monotonic() - started
        inference.join()
    assert 0.5 <= waited < 5  # the listener waited for the checkpoint, and not much longer
    during = [started, *(t for t in ticks if started < t < started + waited), started + waited]
    assert max(b - a for a, b in zip(during, during[1:], strict=False)) < 0.2


def test_a_revoke_the_inference_thread_never_finishes_is_given_up() -> None:
    worker = _worker(shutdown_seconds=0.3)
    with event_loop() as (net, _), capture_logs() as logs:
        started = time.monotonic()
        _revoke(net, worker)
        assert time.monotonic() - started < 3
    assert "revoked partitions not checkpointed in time" in {e["event"] for e in logs}
