"""One stream's session: its cache and where it stands in the dialogue. No model calls here."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from cache_store.state import BlockRef
from worker.model.cache_snapshot import CacheSnapshot
from worker.model.sink_cache import SinkCache


@dataclass
class SessionCounters:
    """Where a stream stands; saved with its state so a restored stream continues exactly."""

    next_offset: int = 0  # the first input offset not yet applied
    next_seq: int = 0  # the sequence number of the next commentary
    records_seen: int = 0
    records_in_turn: int = 0
    tokens_in_turn: int = 0
    first_offset_in_turn: int = -1
    turn_open: bool = False
    started_dialogue: bool = False
    pending: list[int] = field(default_factory=list)  # record tokens not yet fed to the model
    # [start, end) of each earlier commentary turn, counted in the stream's tokens, while some
    # of it is still in the cache: what repetition control looks back on.
    commentary_spans: list[list[int]] = field(default_factory=list)
    # The first tokens of the last few commentaries, kept after their turns leave the cache,
    # so that repetition control still keeps a new commentary from opening like an old one.
    commentary_openings: list[list[int]] = field(default_factory=list)
    last_commentary_time: float | None = None  # wall clock, for operators (streams show)

    def to_meta(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, object]) -> SessionCounters:
        return cls(**meta)


@dataclass
class StreamSession:
    """A stream's sink cache plus counters; `prefilled_tokens` counts model work since load.

    `stored` names the blocks of the cache pieces in the last committed state, which the next
    snapshot names instead of carrying; `unsaved` is the snapshot taken but not yet committed.
    """

    stream_id: str
    cache: SinkCache
    counters: SessionCounters = field(default_factory=SessionCounters)
    prefilled_tokens: int = 0
    turn_started_at: float = field(default_factory=time.monotonic)
    stored: dict[str, BlockRef] = field(default_factory=dict)
    unsaved: CacheSnapshot | None = None

    @property
    def tokens_seen(self) -> int:
        return self.cache.layout.tokens_seen

    def seconds_in_turn(self) -> float:
        return time.monotonic() - self.turn_started_at
