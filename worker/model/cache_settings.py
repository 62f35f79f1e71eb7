"""The size of every stream's sink cache, and how much input goes into one forward."""

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
