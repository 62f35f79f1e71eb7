"""`eval commentary`: write the commentary of a file's streams (or read a dump of it) and score it.

Generation goes through the same StreamProcessor as `streamsink run` on a file, with no saved
state, so the figures are those a user sees. A dump (`run --json` or `consume --json`) is
scored against the input it was written from: a commentary's offsets are taken as that
input's line numbers, as `run` on a file numbers them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from worker.exceptions import StreamsinkError
from worker.ops.metrics import WorkerMetrics
from worker.stream.commentator import Commentator
from worker.stream.processor import StreamProcessor
from worker.stream.records import Commentary, Record
from worker.tools.commentary_scores import QualityReport, Scored, score_streams

StreamLines = dict[str, dict[int, str]]  # stream id -> offset -> line


def stream_lines(records: Iterable[Record]) -> StreamLines:
    """Each stream's lines by offset, decoded the way the processor decodes them."""
    lines: StreamLines = {}
    for record in records:
        if record.stream_id:
            text = record.value.decode("utf-8", errors="replace")
            lines.setdefault(record.stream_id, {})[record.offset] = text
    return lines


def write_commentary(
    commentator: Commentator, batches: Iterable[list[Record]]
) -> tuple[list[Commentary], list[Record], float]:
    """The commentary of every batch, the records read, and the seconds it all took."""
    processor = StreamProcessor(commentator, lambda _stream_id: None, WorkerMetrics())
    produced: list[Commentary] = []
    records: list[Record] = []
    started = time.perf_counter()
    for batch in batches:
        records += batch
        produced += processor.apply(batch).commentary
    return produced, records, time.perf_counter() - started


def read_dump(path: Path) -> list[Commentary]:
    """Commentary records from JSON lines; lines that are not JSON objects are skipped."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            found.append(Commentary(**json.loads(line)))
    return found


def score_commentary(
    commentary: Sequence[Commentary], lines: StreamLines, seconds: float | None = None
) -> QualityReport:
    """Scores of `commentary` against the lines it covers; `seconds`: the time it took."""
    streams: dict[str, list[Scored]] = {}
    for item in sorted(commentary, key=lambda c: (c.stream_id, c.seq)):
        own = lines.get(item.stream_id)
        if own is None:
            raise StreamsinkError(
                f"commentary of stream {item.stream_id!r}, but the input has streams "
                f"{sorted(lines)}; pass the input it was written from (and its --stream or "
                "--key-separator)"
            )
        covered = [t for o, t in own.items() if item.first_offset <= o <= item.last_offset]
        seen = [t for o, t in own.items() if o <= item.last_offset]
        scored = Scored(item.text, "\n".join(covered), "\n".join(seen))
        streams.setdefault(item.stream_id, []).append(scored)
    per_commentary = seconds / len(commentary) if seconds is not None and commentary else None
    return score_streams(list(streams.values()), per_commentary)
