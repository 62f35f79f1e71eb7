"""The budget of live caches: how much of a batch fits, and which saved caches go first."""

from __future__ import annotations

import pytest

from worker.stream.live_budget import Admission, LiveBudget


def _budget(limit: int | None, *live: str) -> LiveBudget[str]:
    budget: LiveBudget[str] = LiveBudget(limit)
    for key in live:
        budget.used(key)
    return budget


def _all_saved(key: str) -> bool:
    return True


def test_without_a_limit_everything_fits_and_nothing_goes() -> None:
    budget = _budget(None, "a", "b")
    assert budget.admit(["c", "d", "e"], _all_saved) == Admission(3, [])


def test_room_is_made_least_recently_used_first() -> None:
    budget = _budget(3, "a", "b", "c")
    budget.used("a")  # b is now the least recently used, then c, then a
    assert budget.admit(["d"], _all_saved) == Admission(1, ["b"])
    assert budget.admit(["d", "e"], _all_saved) == Admission(2, ["b", "c"])


def test_a_cache_the_batch_uses_is_not_dropped_for_it() -> None:
    budget = _budget(2, "a", "b")
    # a is the oldest, but the batch needs it: b makes room for c instead.
    assert budget.admit(["a", "c", "a"], _all_saved) == Admission(3, ["b"])


def test_the_batch_is_cut_where_its_streams_outgrow_the_budget() -> None:
    budget = _budget(2, "a", "b")
    # a, c fit (b goes); d would need a's room too, and a is used by the prefix.
    assert budget.admit(["a", "c", "c", "d", "a"], _all_saved) == Admission(3, ["b"])


def test_unsaved_caches_stay_and_may_leave_no_room() -> None:
    budget = _budget(2, "a", "b")
    saved = {"b"}.__contains__
    assert budget.admit(["c"], saved) == Admission(1, ["b"])
    assert budget.admit(["c", "d"], saved) == Admission(1, ["b"])
    assert budget.admit(["c"], lambda key: False) == Admission(0, [])


def test_records_of_live_or_cacheless_streams_need_no_room() -> None:
    budget = _budget(2, "a", "b")
    assert budget.admit(["a", None, "b", "a", None], lambda key: False) == Admission(5, [])


def test_over_the_budget_live_streams_go_on_and_new_ones_wait() -> None:
    budget = _budget(1, "a", "b", "c")  # over, as after a store outage
    assert budget.admit(["c", "a"], lambda key: False) == Admission(2, [])
    assert budget.admit(["d"], lambda key: False) == Admission(0, [])
    assert budget.admit(["d"], _all_saved) == Admission(1, ["a", "b", "c"])


def test_dropped_and_used_keep_the_order() -> None:
    budget = _budget(2, "a", "b")
    budget.dropped("b")
    budget.dropped("absent")
    assert len(budget) == 1 and "b" not in budget and "a" in budget
    budget.used("c")
    budget.used("a")  # c is now the least recently used
    assert budget.admit(["x"], _all_saved) == Admission(1, ["c"])


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="1 or more"):
        LiveBudget(0)
