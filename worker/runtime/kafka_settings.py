"""The settings of a Kafka worker, shared by its polling and its inference thread."""

from __future__ import annotations

from dataclasses import dataclass

from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.state_loss import StateLossPolicy
from worker.stream.processor import ProcessSettings


@dataclass(frozen=True)
class WorkerSettings:
    input_topic: str
    output_topic: str
    group: str
    dead_letter_topic: str | None = None
    schedule: CheckpointSchedule = CheckpointSchedule()
    shutdown_seconds: float = 60.0
    session_timeout_ms: int = 30000
    max_poll_records: int = 64
    max_queued_batches: int = 8
    on_state_loss: StateLossPolicy = StateLossPolicy.REPLAY
    process: ProcessSettings = ProcessSettings()
