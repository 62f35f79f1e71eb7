"""Partitions of the input topic with lag and no owner in the group: detected and logged.

After a fault the group must hand every partition to a member again. If it does not (a
member that never rejoined, an assignment gone wrong), records wait with nobody to read
them, and nothing else would say so: a worker's lag gauge covers only what it owns. So the
polling thread asks the group coordinator now and then who owns what. A partition that no
member owns while the group's committed offset is behind its end, at two looks in a row, is
counted (`streamsink_errors_total{kind="partition_unowned"}`), shown
(`streamsink_partitions_unowned`) and logged. Two looks, because a cooperative rebalance
leaves the partitions it moves unowned for a moment on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import suppress
from functools import partial
from typing import Any

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from worker.io.kafka_connection import KafkaConnection
from worker.ops.metrics import WorkerMetrics
from worker.runtime.outages import KAFKA, Outages, Unreachable

log = structlog.get_logger("streamsink.worker")

LOOK_SECONDS = 15.0  # between two looks at the group's assignment
REQUEST_TIMEOUT_MS = 5_000


def unowned_with_lag(
    group: Mapping[str, Any], topic: str, ends: Mapping[int, int], committed: Mapping[int, int]
) -> dict[int, int]:
    """Partition -> lag of the topic's partitions no member of a stable group owns.

    `group` is a description as KafkaAdminClient.describe_groups gives it; a group that is
    rebalancing owns nothing for a moment, so it has no unowned partitions yet.
    """
    if group.get("group_state") != "Stable":
        return {}
    owned = {
        number
        for member in group.get("members", [])
        for assigned in (member.get("member_assignment") or {}).get("assigned_partitions", [])
        if assigned["topic"] == topic
        for number in assigned["partitions"]
    }
    lags = {number: end - committed.get(number, 0) for number, end in ends.items()}
    return {number: lag for number, lag in sorted(lags.items()) if number not in owned and lag > 0}


class OwnershipWatch:
    """Looks at the group every LOOK_SECONDS from the polling thread; never raises for an
    outage (the broker's own probe reports those)."""

    def __init__(
        self,
        connection: KafkaConnection,
        group: str,
        metrics: WorkerMetrics,
        outages: Outages,
        look_seconds: float = LOOK_SECONDS,
    ) -> None:
        self.connection, self.group = connection, group
        self.metrics, self.outages, self.look_seconds = metrics, outages, look_seconds
        self._admin: KafkaAdminClient | None = None
        self._suspects: set[int] = set()  # unowned with lag at the last look
        self._next_look = time.monotonic() + look_seconds

    def look(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        if time.monotonic() < self._next_look or not partitions:
            return
        self._next_look = time.monotonic() + self.look_seconds
        ask = partial(self._ask, consumer, partitions)
        try:
            self.judge(self.outages.call(KAFKA, "look at the group", ask))
        except Unreachable:
            self.close()  # a fresh client next time
        except KafkaError as error:  # the watch never takes the worker down
            log.warning("could not look at the group", error=str(error))
            self.close()

    def _ask(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> dict[int, int]:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **self.connection.client_config(),
                request_timeout_ms=REQUEST_TIMEOUT_MS,
                bootstrap_timeout_ms=REQUEST_TIMEOUT_MS,
            )
        group = self._admin.describe_groups([self.group])[self.group]
        committed = self._admin.list_group_offsets({self.group: partitions})[self.group]
        ends = consumer.end_offsets(partitions, timeout_ms=REQUEST_TIMEOUT_MS)
        return unowned_with_lag(
            group,
            partitions[0].topic,
            {tp.partition: end for tp, end in ends.items()},
            {tp.partition: meta.offset for tp, meta in committed.items() if meta.offset >= 0},
        )

    def judge(self, unowned: dict[int, int]) -> None:
        """Raise the alarm for what was unowned with lag at this look and the last."""
        confirmed = {number: lag for number, lag in unowned.items() if number in self._suspects}
        self._suspects = set(unowned)
        self.metrics.partitions_unowned.set(len(confirmed))
        for number, lag in confirmed.items():
            self.metrics.errors.labels(kind="partition_unowned").inc()
            log.error("partition with lag and no owner", partition=number, lag=lag)

    def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with suppress(KafkaError, OSError):
                admin.close()
