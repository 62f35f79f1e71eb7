"""When to checkpoint: after so many records or so many seconds, if anything changed.

One schedule for the local and the Kafka run, so both save as often by default. Records
bound the work a crash replays; seconds bound it for slow streams and time triggers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointSchedule:
    every_records: int = 256
    every_seconds: float = 10.0


class CheckpointClock:
    """Records and seconds since the last checkpoint, measured against a schedule."""

    def __init__(
        self, schedule: CheckpointSchedule, now: Callable[[], float] = time.monotonic
    ) -> None:
        self.schedule = schedule
        self._now = now
        self.records = 0
        self._last = now()

    def count(self, records: int) -> None:
        self.records += records

    def seconds(self) -> float:
        return self._now() - self._last

    def due(self, changed: bool) -> bool:
        """True when something changed and either bound of the schedule is reached."""
        return changed and (
            self.records >= self.schedule.every_records
            or self.seconds() >= self.schedule.every_seconds
        )

    def reset(self) -> None:
        """A checkpoint was made (or tried: a failed one is tried again a full period on)."""
        self.records = 0
        self._last = self._now()
