"""Where a claimed partition resumes, and whether Redis lost states that Kafka says exist.

Redis is the commit point and Kafka's committed offset follows it, so Kafka ahead of Redis
means Redis lost data (a restore from an old snapshot, a flushed database). That is never
recovered from silently: the caller logs and counts it, and the policy says where to go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class StateLossPolicy(StrEnum):
    """What to do when Redis knows less of a partition than Kafka's committed offset says."""

    REPLAY = "replay"  # reprocess from where Redis stands (or the earliest record): no gap
    RESUME = "resume"  # continue at Kafka's committed offset: the lost span gets no commentary


@dataclass(frozen=True)
class SeekDecision:
    offset: int | None  # where to seek; None: the beginning of the partition
    states_lost: bool


def decide_seek(
    stored_offset: int | None, kafka_offset: int | None, policy: StateLossPolicy
) -> SeekDecision:
    """Seek to where the stored states stop, unless they were lost and the policy resumes."""
    lost = kafka_offset is not None and (stored_offset is None or stored_offset < kafka_offset)
    if lost and policy is StateLossPolicy.RESUME:
        return SeekDecision(kafka_offset, states_lost=True)
    return SeekDecision(stored_offset, states_lost=lost)
