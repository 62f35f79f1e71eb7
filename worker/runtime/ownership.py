"""Partitions of the input topic with lag and no owner in the group: detected and logged.

After a fault the group must hand every partition to a member again. If it does not (a
member that never rejoined, an assignment gone wrong), records wait with nobody to read
them, and nothing else would say so: a worker's lag gauge covers only what it owns. So the
polling thread asks the group coordinator now and then who owns what. A partition that no
member owns while the group's committed offset is behind its end, look after look for
longer than a rebalance may leave it so (a cooperative rebalance unassigns what it moves
until its old owner has checkpointed it: the shutdown budget, then a rejoin within a
session), is counted once (`streamsink_errors_total{kind="partition_unowned"}`), shown
while it lasts (`streamsink_partitions_unowned`) and logged. The same look tells whether the
group still lists this member (membership.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from functools import partial
from typing import Any, TypeVar

import structlog
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from worker.io.kafka_connection import KafkaConnection
from worker.ops.metrics import WorkerMetrics
from worker.runtime.kafka_settings import GroupSettings
from worker.runtime.membership import Standing, assigned_partitions, standing
from worker.runtime.outages import KAFKA, Outages, Unreachable

log = structlog.get_logger("streamsink.worker")

T = TypeVar("T")

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
    owned = frozenset().union(
        *(assigned_partitions(member, topic) for member in group.get("members", []))
    )
    lags = {number: end - committed.get(number, 0) for number, end in ends.items()}
    return {number: lag for number, lag in sorted(lags.items()) if number not in owned and lag > 0}


class OwnershipWatch:
    """Looks at the group every LOOK_SECONDS from the polling thread; never raises for an
    outage (the broker's own probe reports those)."""

    def __init__(
        self,
        connection: KafkaConnection,
        group: GroupSettings,
        metrics: WorkerMetrics,
        outages: Outages,
        look_seconds: float = LOOK_SECONDS,
    ) -> None:
        self.connection, self.group = connection, group.name
        self.metrics, self.outages, self.look_seconds = metrics, outages, look_seconds
        self.grace_seconds = group.shutdown_seconds + group.session_timeout_ms / 1000
        self._admin: KafkaAdminClient | None = None
        self._since: dict[int, float] = {}  # unowned with lag at every look since then
        self._alarmed: set[int] = set()
        self._next_look = time.monotonic() + look_seconds

    def look(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> Standing | None:
        """Every look_seconds, judge the unowned partitions; this member's standing in the
        group at that look (membership.py), or None between looks or when it cannot tell."""
        if time.monotonic() < self._next_look or not partitions:
            return None
        self._next_look = time.monotonic() + self.look_seconds
        ask = partial(self._ask, consumer, partitions)
        looked = self._asking("look at the group", ask)
        if looked is None:
            return None
        unowned, seen = looked
        self.judge(unowned)
        return seen

    def standing(self, consumer: KafkaConsumer, topic: str) -> Standing | None:
        """This member's standing in the group now, or None when it cannot tell."""
        ask = partial(self._standing, consumer, topic)
        return self._asking("ask the group about this member", ask)

    def _asking(self, what: str, ask: Callable[[], T]) -> T | None:
        """`ask` through the outages; None when the brokers or the group do not answer."""
        try:
            return self.outages.call(KAFKA, what, ask)
        except Unreachable:
            self.close()  # a fresh client next time
        except KafkaError as error:  # the watch never takes the worker down
            log.warning("could not look at the group", error=str(error))
            self.close()
        return None

    def _client(self) -> KafkaAdminClient:
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **self.connection.client_config(),
                request_timeout_ms=REQUEST_TIMEOUT_MS,
                bootstrap_timeout_ms=REQUEST_TIMEOUT_MS,
            )
        return self._admin

    def _described(self) -> dict[str, Any]:
        return self._client().describe_groups([self.group])[self.group]

    def _standing(self, consumer: KafkaConsumer, topic: str) -> Standing | None:
        return standing(self._described(), consumer.group_metadata(), topic)

    def _ask(
        self, consumer: KafkaConsumer, partitions: list[TopicPartition]
    ) -> tuple[dict[int, int], Standing | None]:
        group = self._described()
        committed = self._client().list_group_offsets({self.group: partitions})[self.group]
        ends = consumer.end_offsets(partitions, timeout_ms=REQUEST_TIMEOUT_MS)
        topic = partitions[0].topic
        unowned = unowned_with_lag(
            group,
            topic,
            {tp.partition: end for tp, end in ends.items()},
            {tp.partition: meta.offset for tp, meta in committed.items() if meta.offset >= 0},
        )
        return unowned, standing(group, consumer.group_metadata(), topic)

    def judge(self, unowned: dict[int, int], now: float | None = None) -> None:
        """Raise the alarm, once, for what has stayed unowned with lag past the grace."""
        now = time.monotonic() if now is None else now
        self._since = {number: self._since.get(number, now) for number in unowned}
        self._alarmed &= set(unowned)
        overdue = {n for n, since in self._since.items() if now - since >= self.grace_seconds}
        self.metrics.partitions_unowned.set(len(overdue))
        for number in sorted(overdue - self._alarmed):
            self.metrics.errors.labels(kind="partition_unowned").inc()
            log.error(
                "partition with lag and no owner",
                partition=number,
                lag=unowned[number],
                seconds=round(now - self._since[number]),
            )
        self._alarmed |= overdue

    def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            with suppress(KafkaError, OSError):
                admin.close()
