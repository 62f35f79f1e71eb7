"""Partitions fenced off here that the group still assigns here, claimed again.

A worker that was stopped (SIGSTOP, a long pause) past its session comes back to find its
writes fenced: another worker claimed the partition meanwhile. It drops the partition. A
cooperative rebalance, though, keeps what a member says it owns, so the group can leave the
partition with it, and no new assignment ever comes to claim it again: it would stall, with
lag, while the coordinator counts it owned. So a fenced partition that is still assigned here
once a session has passed (time for the group to move it, if it is moving) is claimed again,
if the group's own description assigns it here: that fences the other writer in turn, and the
partition resumes from its committed state. One the group gives to another member, or that
the group cannot tell about now, is looked at again a session later: a member the group
dropped unnoticed still has its partitions "assigned" (membership.py), and claiming them
would take them from their real owners.
"""

from __future__ import annotations

from collections.abc import Collection

from kafka import TopicPartition


class FencedPartitions:
    """When each fenced partition may be claimed again; the polling thread's alone."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self._due: dict[TopicPartition, float] = {}

    def fenced(self, partition: TopicPartition, now: float) -> None:
        self._due[partition] = now + self.grace_seconds

    def claimed(self, partition: TopicPartition) -> None:
        """A claim came through another way (a new assignment): nothing to reclaim."""
        self._due.pop(partition, None)

    def due(self, assignment: Collection[TopicPartition], now: float) -> list[TopicPartition]:
        """The partitions to claim again now: fenced a grace ago and still assigned here.
        One no longer assigned here is forgotten: the group moved it, as it should."""
        ready = [p for p, at in self._due.items() if at <= now]
        for partition in ready:
            del self._due[partition]
        return sorted((p for p in ready if p in assignment), key=lambda p: p.partition)

    def confirmed(
        self, due: list[TopicPartition], given_here: Collection[int], now: float
    ) -> list[TopicPartition]:
        """Of the `due` partitions, those the group gives this member (`given_here`, by
        number); the others are due again a grace later."""
        for partition in due:
            if partition.partition not in given_here:
                self.fenced(partition, now)
        return [p for p in due if p.partition in given_here]
