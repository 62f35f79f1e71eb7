"""A member the group dropped without its knowing: found by asking the group, and rejoined.

kafka-python learns that the coordinator dropped its member from a heartbeat's answer. If its
heartbeats stop while it believes itself a stable member (seen once in the chaos runs,
kafka-python 3.0.12: not a coordinator message for minutes after a join), the group moves its
partitions on and the worker never hears of it: it goes on fetching, is fenced at every write,
and would claim its "still assigned" partitions back from their real owners, again and again.

So the polling thread compares what the consumer believes with what the coordinator says
(`describe_groups`, which the ownership watch asks anyway). A stable group that has not
listed this member for a session (time enough for a working heartbeat to have heard) has
dropped it: the worker leaves, drops its partitions as lost (their epochs are stale), and
joins again as a new member. A fenced partition is claimed again only while the group lists
it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import ConsumerGroupMetadata, MemberState


@dataclass(frozen=True)
class Standing:
    """What a stable group says of one member: listed or not, and the partitions it gives it."""

    member_id: str
    listed: bool
    partitions: frozenset[int]


def standing(
    group: Mapping[str, Any], member: ConsumerGroupMetadata, topic: str
) -> Standing | None:
    """This member's standing in `group` (a describe_groups description), or None while
    either side is between generations and the two cannot be compared."""
    if group.get("group_state") != "Stable" or member.state != MemberState.STABLE:
        return None
    for described in group.get("members", []):
        if described.get("member_id") == member.member_id:
            return Standing(member.member_id, True, assigned_partitions(described, topic))
    return Standing(member.member_id, False, frozenset())


def assigned_partitions(member: Mapping[str, Any], topic: str) -> frozenset[int]:
    """The partitions of `topic` a described member (one of describe_groups' members) has."""
    assignment = member.get("member_assignment") or {}
    return frozenset(
        number
        for assigned in assignment.get("assigned_partitions", [])
        if assigned["topic"] == topic
        for number in assigned["partitions"]
    )


class DroppedMembership:
    """Whether the group has gone a grace without listing this member; the polling thread's."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self._unlisted: tuple[str, float] | None = None  # member id, first seen unlisted

    def dropped(self, seen: Standing | None, now: float) -> bool:
        """Judge one look at the group; None (it could not tell) changes nothing."""
        if seen is None:
            return False
        if seen.listed:
            self._unlisted = None
            return False
        if self._unlisted is None or self._unlisted[0] != seen.member_id:
            self._unlisted = (seen.member_id, now)
        return now - self._unlisted[1] >= self.grace_seconds


def rejoin(
    consumer: KafkaConsumer, listener: AsyncConsumerRebalanceListener
) -> set[TopicPartition]:
    """Leave the group and subscribe again, to join as a new member at the next poll.

    Returns the partitions the consumer held: the caller drops them as lost, since kafka-python
    calls no listener for what an unsubscribe takes away.
    """
    held = set(consumer.assignment())
    topics = sorted(consumer.subscription() or ())
    consumer.unsubscribe()
    consumer.subscribe(topics, listener=listener)
    return held
