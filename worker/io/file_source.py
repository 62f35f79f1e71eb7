"""Where records come from: the interface, and a file or stdin for local runs."""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from worker.stream.records import Record


class Source(ABC):
    """Yields batches of records in offset order; an empty batch means 'nothing new yet'."""

    @abstractmethod
    def batches(self) -> Iterator[list[Record]]: ...

    def close(self) -> None:
        """Release what the source holds."""


@dataclass(frozen=True)
class LineKeys:
    """How a line names its stream: one stream id for every line, or, with `separator`, the
    text before the first separator (a line without one has no key)."""

    stream: str | None = None
    separator: str | None = None

    def split(self, line: bytes) -> tuple[bytes | None, bytes]:
        """(key, value) of a line without its line break; the key is None when it has none."""
        if self.separator is None:
            return (None if self.stream is None else self.stream.encode()), line
        key, separator, rest = line.partition(self.separator.encode())
        return (key, rest) if separator else (None, line)


class FileSource(Source):
    """Lines of a file (or stdin for '-') as records; offset = line number, from 0.

    `keys` says which stream each line belongs to; without a stream id or a separator, every
    line belongs to a stream named after the file ("stdin" for '-'). With `follow`, the source
    waits for more lines at the end, like `tail -f`.
    """

    def __init__(
        self,
        path: str,
        keys: LineKeys = LineKeys(),
        follow: bool = False,
        batch_size: int = 64,
        poll_seconds: float = 0.5,
    ) -> None:
        self.path = path
        if keys.stream is None and keys.separator is None:
            keys = LineKeys(stream="stdin" if path == "-" else Path(path).stem)
        self.keys = keys
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
        key, value = self.keys.split(line.rstrip(b"\r\n"))
        stream_id = None if key is None else key.decode("utf-8", errors="replace")
        return Record(stream_id, offset, value)

    def close(self) -> None:
        if self._handle is not None and self._handle is not sys.stdin.buffer:
            self._handle.close()
