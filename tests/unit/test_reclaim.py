"""When the polling thread claims a fenced partition again."""

from __future__ import annotations

from kafka import TopicPartition

from worker.runtime.reclaim import FencedPartitions

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def test_a_fenced_partition_still_assigned_is_due_once_the_grace_has_passed() -> None:
    fenced = FencedPartitions(grace_seconds=30)
    fenced.fenced(P0, now=100)
    assert fenced.due({P0, P1}, now=129) == []
    assert fenced.due({P0, P1}, now=130) == [P0]
    assert fenced.due({P0, P1}, now=200) == []  # claimed once, not on every poll


def test_a_partition_the_group_moved_away_is_forgotten() -> None:
    fenced = FencedPartitions(grace_seconds=30)
    fenced.fenced(P0, now=0)
    assert fenced.due({P1}, now=31) == []
    assert fenced.due({P0, P1}, now=62) == []  # assigned back later: a new claim covers it


def test_a_claim_that_came_another_way_cancels_the_reclaim() -> None:
    fenced = FencedPartitions(grace_seconds=30)
    fenced.fenced(P0, now=0)
    fenced.fenced(P1, now=0)
    fenced.claimed(P0)
    assert fenced.due({P0, P1}, now=31) == [P1]


def test_only_what_the_group_gives_here_is_claimed_and_the_rest_is_asked_about_later() -> None:
    fenced = FencedPartitions(grace_seconds=30)
    fenced.fenced(P0, now=0)
    fenced.fenced(P1, now=0)
    due = fenced.due({P0, P1}, now=30)
    assert fenced.confirmed(due, given_here={1, 5}, now=30) == [P1]
    assert fenced.due({P0, P1}, now=59) == []
    assert fenced.due({P0, P1}, now=60) == [P0]  # the group could tell nothing: again later
    assert fenced.confirmed([P0], given_here=(), now=60) == []
    assert fenced.due({P0, P1}, now=90) == [P0]
