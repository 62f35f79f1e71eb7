"""When to comment and how to decode: fixed triggers and greedy decoding make runs replayable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommentaryPolicy:
    """Comment after `every_records` records, `every_tokens` tokens or `every_seconds` seconds
    of input since the last commentary (whichever comes first; None disables a trigger)."""

    every_records: int | None = 8
    every_tokens: int | None = None
    every_seconds: float | None = None
    max_new_tokens: int = 48
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0
    # Repetition control over the stream's earlier commentary still in the cache and the
    # turn being written (see sampling.repetition_controls).
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 4

    def __post_init__(self) -> None:
        if not (self.every_records or self.every_tokens or self.every_seconds):
            raise ValueError("set at least one commentary trigger (records, tokens or seconds)")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.repetition_penalty <= 0:
            raise ValueError("the repetition penalty must be above 0 (1.0 is none)")
        if self.no_repeat_ngram < 0:
            raise ValueError("no_repeat_ngram must be 0 (off) or more")

    def due(self, records: int, tokens: int, seconds: float) -> bool:
        if records == 0:
            return False
        return bool(
            (self.every_records and records >= self.every_records)
            or (self.every_tokens and tokens >= self.every_tokens)
            or (self.every_seconds and seconds >= self.every_seconds)
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
