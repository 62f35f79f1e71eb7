"""How a worker processes records: their size limit, what becomes of a stream whose saved
state cannot be used, how many caches stay in memory. Plain settings, so the CLI builds them
without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from worker.stream.records import DEFAULT_MAX_RECORD_BYTES


class BadStatePolicy(StrEnum):
    """What to do with a stream whose saved state cannot be used (corrupt, another model)."""

    SKIP = "skip"  # leave the state alone and set the stream's records aside (dead letters)
    RESTART = "restart"  # start afresh, seq from 0 again; the bad state is replaced


@dataclass(frozen=True)
class ProcessSettings:
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    # Skipping is the default: a restarted stream would reuse seq numbers consumers have seen.
    on_bad_state: BadStatePolicy = BadStatePolicy.SKIP
    max_live_streams: int | None = None  # caches kept in memory; None: every stream seen
