"""Partitions with lag and no owner: found in the group's description, alarmed at two looks."""

from __future__ import annotations

from worker.io.kafka_connection import KafkaConnection
from worker.ops.health import Health
from worker.ops.metrics import WorkerMetrics
from worker.runtime.kafka_settings import GroupSettings
from worker.runtime.outages import Outages
from worker.runtime.ownership import OwnershipWatch, unowned_with_lag


def _group(state: str, *assignments: list[int], topic: str = "in") -> dict:
    members = [
        {"member_assignment": {"assigned_partitions": [{"topic": topic, "partitions": parts}]}}
        for parts in assignments
    ]
    return {"group_state": state, "members": members}


ENDS = {0: 10, 1: 10, 2: 10, 3: 0}


def test_a_partition_no_member_owns_is_unowned_while_it_has_lag() -> None:
    group = _group("Stable", [0], [1])
    assert unowned_with_lag(group, "in", ENDS, {2: 4}) == {2: 6}  # 3 has no records: no lag
    assert unowned_with_lag(group, "in", ENDS, {2: 10}) == {}


def test_another_topics_assignment_owns_nothing_of_this_one() -> None:
    group = _group("Stable", [0, 1, 2, 3], topic="other")
    assert unowned_with_lag(group, "in", ENDS, {}) == {0: 10, 1: 10, 2: 10}


def test_a_rebalancing_group_is_not_judged() -> None:
    assert unowned_with_lag(_group("PreparingRebalance"), "in", ENDS, {}) == {}
    assert unowned_with_lag(_group("Empty"), "in", ENDS, {}) == {}


def test_only_what_stays_unowned_past_a_rebalance_is_counted_once_and_shown() -> None:
    metrics = WorkerMetrics()
    group = GroupSettings("g", session_timeout_ms=6000, shutdown_seconds=30)
    watch = OwnershipWatch(
        KafkaConnection("127.0.0.1:9"), group, metrics, Outages(Health(), metrics)
    )
    assert watch.grace_seconds == 36
    watch.judge({2: 6}, now=0)  # a cooperative rebalance moving partition 2, perhaps
    watch.judge({2: 6, 5: 1}, now=30)
    assert metrics.value("streamsink_partitions_unowned") == 0
    watch.judge({2: 6, 5: 1}, now=40)
    assert metrics.value("streamsink_partitions_unowned") == 1
    assert metrics.value("streamsink_errors", kind="partition_unowned") == 1
    watch.judge({2: 9, 5: 1}, now=70)  # still unowned: shown, not counted again
    assert metrics.value("streamsink_partitions_unowned") == 2
    assert metrics.value("streamsink_errors", kind="partition_unowned") == 2
    watch.judge({5: 1}, now=80)
    watch.judge({2: 9}, now=90)  # a new stretch without an owner starts from nothing
    assert metrics.value("streamsink_partitions_unowned") == 0
    assert metrics.value("streamsink_errors", kind="partition_unowned") == 2
