"""Whether the group still lists this member: its standing in a description, judged over time."""

from __future__ import annotations

from kafka.structs import ConsumerGroupMetadata, MemberState

from worker.runtime.membership import DroppedMembership, Standing, standing

ME = ConsumerGroupMetadata("g", 3, "me-1", None, MemberState.STABLE)


def _group(state: str, **assignments: list[int]) -> dict:
    members = [
        {
            "member_id": member_id,
            "member_assignment": {"assigned_partitions": [{"topic": "in", "partitions": parts}]},
        }
        for member_id, parts in assignments.items()
    ]
    return {"group_state": state, "members": members}


def test_a_listed_member_has_the_partitions_of_its_topic_the_group_gives_it() -> None:
    group = _group("Stable", **{"me-1": [0, 2], "other": [1, 3]})
    group["members"][0]["member_assignment"]["assigned_partitions"].append(
        {"topic": "elsewhere", "partitions": [7]}
    )
    assert standing(group, ME, "in") == Standing("me-1", True, frozenset({0, 2}))
    no_assignment = {"group_state": "Stable", "members": [{"member_id": "me-1"}]}
    assert standing(no_assignment, ME, "in") == Standing("me-1", True, frozenset())


def test_a_stable_group_without_this_member_leaves_it_unlisted() -> None:
    assert standing(_group("Stable", other=[0, 1, 2, 3]), ME, "in") == Standing(
        "me-1", False, frozenset()
    )


def test_nothing_is_told_while_the_group_is_between_generations() -> None:
    assert standing(_group("PreparingRebalance", other=[0]), ME, "in") is None
    assert standing(_group("CompletingRebalance", other=[0]), ME, "in") is None


def test_a_member_that_believes_itself_joining_is_unlisted_all_the_same() -> None:
    """A join that reached the broker would have the group rebalancing, not stable."""
    for state in (MemberState.REBALANCING, MemberState.UNJOINED):
        joining = ME._replace(state=state)
        assert standing(_group("Stable", other=[0]), joining, "in") == Standing(
            "me-1", False, frozenset()
        )
        assert standing(_group("Stable", **{"me-1": [0]}), joining, "in") == Standing(
            "me-1", True, frozenset({0})
        )


def test_a_group_that_dropped_its_last_member_leaves_it_unlisted() -> None:
    for state in ("Empty", "Dead"):
        assert standing(_group(state), ME, "in") == Standing("me-1", False, frozenset())


def test_a_consumer_without_a_member_id_yet_is_not_judged() -> None:
    unknown = ME._replace(member_id="", state=MemberState.UNJOINED)
    assert standing(_group("Stable", other=[0]), unknown, "in") is None


def test_a_member_is_dropped_once_unlisted_for_the_grace() -> None:
    unlisted = Standing("me-1", False, frozenset())
    judge = DroppedMembership(grace_seconds=6)
    assert not judge.dropped(unlisted, now=100)  # a heartbeat may not have told it yet
    assert not judge.dropped(None, now=104)  # a look that tells nothing keeps the count
    assert not judge.dropped(unlisted, now=105.9)
    assert judge.dropped(unlisted, now=106)


def test_being_listed_again_or_a_new_member_id_starts_the_count_again() -> None:
    judge = DroppedMembership(grace_seconds=6)
    assert not judge.dropped(Standing("me-1", False, frozenset()), now=0)
    assert not judge.dropped(Standing("me-1", True, frozenset({0})), now=3)
    assert not judge.dropped(Standing("me-1", False, frozenset()), now=7)
    assert not judge.dropped(Standing("me-2", False, frozenset()), now=13)  # joined again
    assert judge.dropped(Standing("me-2", False, frozenset()), now=19)
