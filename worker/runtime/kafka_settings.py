"""The settings of a Kafka worker, shared by its polling and its inference thread."""

from __future__ import annotations

from dataclasses import dataclass

from worker.io.topics import TopicNames
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.state_loss import StateLossPolicy
from worker.stream.process_settings import ProcessSettings


@dataclass(frozen=True)
class GroupSettings:
    """How the worker takes part in its consumer group, and how it leaves it."""

    name: str = "streamsink"
    session_timeout_ms: int = 30000
    shutdown_seconds: float = 60.0  # budget of the last checkpoint on a revoke or SIGTERM
    on_state_loss: StateLossPolicy = StateLossPolicy.REPLAY
    max_poll_records: int = 64
    max_queued_batches: int = 8  # batches waiting for inference before partitions pause


@dataclass(frozen=True)
class WorkerSettings:
    topics: TopicNames = TopicNames()
    group: GroupSettings = GroupSettings()
    schedule: CheckpointSchedule = CheckpointSchedule()
    process: ProcessSettings = ProcessSettings()
