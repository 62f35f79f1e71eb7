"""Where a claimed partition resumes when Redis and Kafka's committed offset disagree."""

from __future__ import annotations

import pytest

from worker.runtime.state_loss import SeekDecision, StateLossPolicy, decide_seek


@pytest.mark.parametrize("policy", list(StateLossPolicy))
@pytest.mark.parametrize(
    ("stored", "kafka", "expected"),
    [
        (None, None, None),  # a partition never seen: from the beginning
        (7, None, 7),  # Kafka never committed: where the states stop
        (7, 7, 7),  # both agree
        (9, 7, 9),  # Kafka's commit follows Redis, so it may lag: Redis wins, no loss
    ],
)
def test_no_loss_seeks_where_the_states_stop(policy, stored, kafka, expected) -> None:
    assert decide_seek(stored, kafka, policy) == SeekDecision(expected, states_lost=False)


@pytest.mark.parametrize(("stored", "replay_at"), [(3, 3), (None, None)])
def test_replay_reprocesses_from_where_redis_stands(stored, replay_at) -> None:
    decision = decide_seek(stored, 7, StateLossPolicy.REPLAY)
    assert decision == SeekDecision(replay_at, states_lost=True)


@pytest.mark.parametrize("stored", [3, None])
def test_resume_continues_at_kafkas_offset(stored) -> None:
    assert decide_seek(stored, 7, StateLossPolicy.RESUME) == SeekDecision(7, states_lost=True)
