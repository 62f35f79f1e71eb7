"""An in-memory commentary output for tests: it keeps what it is given, in order."""

from __future__ import annotations

from worker.io.outputs import CommentaryOutput
from worker.stream.records import Commentary


class ListOutput(CommentaryOutput):
    def __init__(self) -> None:
        self.items: list[Commentary] = []

    def emit(self, commentary: Commentary) -> None:
        self.items.append(commentary)
