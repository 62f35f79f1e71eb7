"""The file source: offsets, stream ids, and following a growing file."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from worker.io.file_source import FileSource, LineKeys


def test_lines_become_records_with_line_offsets_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "mixed.log"
    path.write_bytes(b"web|GET /\ndb|slow query\nno key here\nweb|\xffbad\n")
    source = FileSource(str(path), LineKeys(separator="|"), batch_size=3)
    batches = list(source.batches())
    assert [len(b) for b in batches] == [3, 1]
    records = [r for batch in batches for r in batch]
    assert [(r.stream_id, r.offset, r.value) for r in records] == [
        ("web", 0, b"GET /"),
        ("db", 1, b"slow query"),
        (None, 2, b"no key here"),
        ("web", 3, b"\xffbad"),
    ]


def test_without_separator_the_file_name_is_the_stream_id(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("one\ntwo\n")
    records = [r for batch in FileSource(str(path)).batches() for r in batch]
    assert [(r.stream_id, r.value) for r in records] == [("app", b"one"), ("app", b"two")]


def test_follow_reads_lines_appended_later_and_waits_for_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    path.write_text("first\n")
    source = FileSource(str(path), follow=True, poll_seconds=0.01)
    seen: list[bytes] = []

    def consume() -> None:
        for batch in source.batches():
            seen.extend(record.value for record in batch)

    reader = threading.Thread(target=consume)
    reader.start()
    with path.open("a") as handle:
        handle.write("sec")
        handle.flush()
        time.sleep(0.1)
        handle.write("ond\nthird\n")
    deadline = time.monotonic() + 5
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    source.stop()
    reader.join(timeout=5)
    assert seen == [b"first", b"second", b"third"]
