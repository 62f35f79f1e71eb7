"""The checkpoint schedule: due by records, by seconds, never when nothing changed."""

from __future__ import annotations

from worker.runtime.checkpoint_schedule import CheckpointClock, CheckpointSchedule


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_default_for_every_run() -> None:
    assert CheckpointSchedule() == CheckpointSchedule(every_records=256, every_seconds=10.0)


def test_due_by_records_and_reset_by_a_checkpoint() -> None:
    clock = CheckpointClock(CheckpointSchedule(every_records=5, every_seconds=60), FakeTime())
    clock.count(4)
    assert not clock.due(changed=True)
    clock.count(1)
    assert clock.due(changed=True) and clock.records == 5
    clock.reset()
    assert not clock.due(changed=True) and clock.records == 0


def test_due_by_seconds() -> None:
    time = FakeTime()
    clock = CheckpointClock(CheckpointSchedule(every_records=1000, every_seconds=10), time)
    time.now += 9.5
    assert not clock.due(changed=True)
    time.now += 0.5
    assert clock.due(changed=True) and clock.seconds() == 10.0
    clock.reset()
    assert not clock.due(changed=True)


def test_not_due_when_nothing_changed() -> None:
    time = FakeTime()
    clock = CheckpointClock(CheckpointSchedule(every_records=1, every_seconds=1), time)
    clock.count(50)
    time.now += 50
    assert not clock.due(changed=False)
    assert clock.due(changed=True)
