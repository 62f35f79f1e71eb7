"""Where records come from: the interface, and a file or stdin for local runs."""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from worker.stream.records import Record


class Source(ABC):
    """Yields batches of records in offset order; an empty batch means 'nothing new yet'."""

    @abstractmethod
    def batches(self) -> Iterator[list[Record]]: ...

    def close(self) -> None:
        """Release what the source holds."""


class FileSource(Source):
    """Lines of a file (or stdin for '-') as records; offset = line number, from 0.

    Without `key_separator` every line belongs to `stream_id`; with it, the text before the
    first separator is the stream id (a line without one is a record without a key). With
    `follow`, the source waits for more lines at the end, like `tail -f`.
    """

    def __init__(
        self,
        path: str,
        stream_id: str | None = None,
        key_separator: str | None = None,
        follow: bool = False,
        batch_size: int = 64,
        poll_seconds: float = 0.5,
    ) -> None:
        self.path = path
        self.stream_id = stream_id or ("stdin" if path == "-" else Path(path).stem)
        self.key_separator = key_separator.encode() if key_separator else None
        self.follow = follow
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self._handle: BinaryIO | None = None
        self._stopped = False

    def stop(self) -> None:
        """Make a following source end at its next poll."""
        self._stopped = True

    def batches(self) -> Iterator[list[Record]]:
        self._handle = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")  # noqa: SIM115
        offset, batch, pending = 0, [], b""
        while not self._stopped:
            line = self._handle.readline()
            if line and not line.endswith(b"\n") and self.follow:
                pending += line  # a line still being written: wait for its end
                continue
            if line:
                batch.append(self._record(offset, pending + line))
                offset, pending = offset + 1, b""
                if len(batch) < self.batch_size:
                    continue
            if batch or self.follow:
                yield batch
                batch = []
            if not line:
                if not self.follow:
                    return
                time.sleep(self.poll_seconds)

    def _record(self, offset: int, line: bytes) -> Record:
        value = line.rstrip(b"\r\n")
        if self.key_separator is None:
            return Record(self.stream_id, offset, value)
        key, separator, rest = value.partition(self.key_separator)
        if not separator:
            return Record(None, offset, value)
        return Record(key.decode("utf-8", errors="replace"), offset, rest)

    def close(self) -> None:
        if self._handle is not None and self._handle is not sys.stdin.buffer:
            self._handle.close()
