"""How much goes into one forward: a stream's cache and input chunks, the streams of a decode
step. Plain settings, so the CLI builds them without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheSettings:
    sinks: int = 4
    window: int = 1020
    max_chunk: int = 256  # longer inputs are fed in pieces of at most this many tokens

    @property
    def capacity(self) -> int:
        return self.sinks + self.window


@dataclass(frozen=True)
class BatchSettings:
    """How many streams decode in one forward at most: None, every one due; 1, one at a time."""

    max_batch: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, not {self.max_batch}")
