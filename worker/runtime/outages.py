"""Outages of the broker or of Redis, waited out in place.

A worker that exits on an outage reloads its model and joins its group again once it is
restarted, which costs far more than most outages last; one that waits goes on where it
stopped. So the calls of the Kafka run that reach a service go through `Outages`: a failure
the service may recover from marks it cut off (/readyz says so, and no rollout counts the
worker available), counts `streamsink_errors_total{kind=<service>_unavailable}`, logs a
warning and waits a backoff before the caller tries again; the first success clears it.
Failures waiting will not fix (a refused password, a bad setting) are raised as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import structlog
from kafka.errors import KafkaError

from cache_store.partition import StoreRefusedError, StoreUnavailableError
from worker.ops.health import Health
from worker.ops.metrics import WorkerMetrics

log = structlog.get_logger("streamsink.worker")

KAFKA, REDIS = "Kafka", "Redis"
FIRST_DELAY_SECONDS, MAX_DELAY_SECONDS = 0.5, 10.0

T = TypeVar("T")


class Unreachable(Exception):
    """The service did not answer; the failure is counted and logged, and a backoff waited."""


class Outages:
    """The services' reachability and the backoff of each; `stop` ends every wait (the worker
    hands it its own as it runs)."""

    def __init__(self, health: Health, metrics: WorkerMetrics) -> None:
        self.health, self.metrics = health, metrics
        self.stop = threading.Event()
        self._failures: dict[str, int] = {}

    def call(
        self, service: str, what: str, call: Callable[[], T], proves_contact: bool = True
    ) -> T:
        """`call`'s result, or Unreachable if the service is out of reach.

        `proves_contact=False` for calls that can succeed without reaching the service (a
        poll returns nothing while the broker is down): their success clears nothing.
        """
        try:
            result = call()
        except (KafkaError, StoreUnavailableError) as error:
            if not _recoverable(service, error):
                raise
            self._failed(service, what, error)
            raise Unreachable(f"{service} is unreachable: {error}") from error
        if proves_contact:
            self._reached(service)
        return result

    def wait_for(self, service: str, what: str, call: Callable[[], T]) -> T:
        """`call`'s result once the service answers; Unreachable if the worker stops first."""
        while True:
            try:
                return self.call(service, what, call)
            except Unreachable:
                if self.stop.is_set():
                    raise

    def _failed(self, service: str, what: str, error: Exception) -> None:
        failures = self._failures.get(service, 0) + 1
        self._failures[service] = failures
        delay = min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * 2 ** (failures - 1))
        self.health.cut_off(service)
        self.metrics.errors.labels(kind=f"{service.lower()}_unavailable").inc()
        log.warning(f"{service} unavailable: waiting", doing=what, error=str(error), retry_in=delay)
        self.stop.wait(delay)

    def _reached(self, service: str) -> None:
        self._failures.pop(service, None)
        if self.health.reconnected(service):
            log.info(f"{service} reachable again")


def _recoverable(service: str, error: Exception) -> bool:
    """Whether waiting may fix it: a retriable Kafka error, a Redis that does not answer."""
    if service == KAFKA:
        return isinstance(error, KafkaError) and error.retriable
    return isinstance(error, StoreUnavailableError) and not isinstance(error, StoreRefusedError)
