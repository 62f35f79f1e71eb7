"""A member the group dropped without its knowing: found by asking the group, and replaced.

kafka-python learns that the coordinator dropped its member from a heartbeat's answer. If its
heartbeats stop while it believes itself a member, the group moves its partitions on and the
worker never hears of it: it goes on fetching, is fenced at every write, and would claim its
"still assigned" partitions back from their real owners, again and again. kafka-python 3.0.12
gets there: a join whose end no poll reads leaves its member mid-join for good, heartbeats
off (a leader that assigned before its metadata came rejoins once it comes; if the poll that
awaits that rejoin times out before its last answer, the next polls no longer see a rejoin to
finish). Chaos runs showed such a member for minutes.

So the polling thread compares the consumer's member id with what the coordinator says
(`describe_groups`, which the ownership watch asks anyway). A settled group (stable, or empty)
that has not listed this member for a session has dropped it, whatever the consumer believes:
a join that reached the broker would have the group rebalancing, and a working heartbeat
would have heard in that time. The worker then replaces the consumer: the old one's
partitions are lost (their epochs are stale), and a new consumer joins as a new member;
leaving and subscribing again would not do, the old consumer's stranded join staying as it
is. A fenced partition is claimed again only while the group lists it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import ConsumerGroupMetadata

# A group in none of its rebalancing states: "Empty" once it has dropped its last member,
# which the only worker of a small deployment may be.
SETTLED_GROUP_STATES = frozenset({"Stable", "Empty", "Dead"})
CLOSE_TIMEOUT_MS = 5_000  # what closing a dropped consumer may take (it leaves the group)


@dataclass(frozen=True)
class Standing:
    """What a stable group says of one member: listed or not, and the partitions it gives it."""

    member_id: str
    listed: bool
    partitions: frozenset[int]


def standing(
    group: Mapping[str, Any], member: ConsumerGroupMetadata, topic: str
) -> Standing | None:
    """This member's standing in `group` (a describe_groups description), or None while the
    group is between generations, or the consumer has no member id yet, and the two cannot be
    compared."""
    if group.get("group_state") not in SETTLED_GROUP_STATES or not member.member_id:
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


def retire(stale: KafkaConsumer) -> set[TopicPartition]:
    """Close `stale`, a consumer the group dropped, once a new one is there to take its place.

    Returns the partitions it held: the caller drops them as lost. The unsubscribe takes them
    away without a listener's call (closing would call it to revoke them, a checkpoint their
    stale epochs could not write).
    """
    held = set(stale.assignment())
    stale.unsubscribe()
    with suppress(KafkaError):  # the broker is down: its member is gone all the same
        stale.close(autocommit=False, timeout_ms=CLOSE_TIMEOUT_MS)
    return held
