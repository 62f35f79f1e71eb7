"""Where commentary goes: the interface, a terminal printer and JSON lines."""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from typing import TextIO

from worker.stream.records import Commentary


class CommentaryOutput(ABC):
    @abstractmethod
    def emit(self, commentary: Commentary) -> None: ...

    def flush(self) -> None:
        """Make everything emitted durable before the state that covers it is saved."""


class TextOutput(CommentaryOutput):
    """One readable line per commentary: `[stream #seq lines a-b] text`."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def emit(self, commentary: Commentary) -> None:
        c = commentary
        print(
            f"[{c.stream_id} #{c.seq} lines {c.first_offset}-{c.last_offset}] {c.text}",
            file=self.out,
        )

    def flush(self) -> None:
        self.out.flush()


class JsonLinesOutput(TextOutput):
    """One JSON object per commentary, the same record the output topic carries."""

    def emit(self, commentary: Commentary) -> None:
        print(json.dumps(commentary.to_json_dict(), ensure_ascii=False), file=self.out)
