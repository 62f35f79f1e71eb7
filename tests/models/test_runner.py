"""The local run loop: file in, commentary out, state in a directory, bad input skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from cache_store.local import LocalDirStore
from tests.memory_outputs import ListOutput
from tests.models.tiny_models import tiny_loaded, tiny_variant
from worker.io.file_source import FileSource, LineKeys
from worker.model.cache_settings import CacheSettings
from worker.model.loading import LoadedModel
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.local_run import Runner, RunSettings
from worker.stream.chat_format import Prompt
from worker.stream.commentator import Commentator
from worker.stream.policy import CommentaryPolicy
from worker.stream.process_settings import BadStatePolicy, ProcessSettings

LINES = [f"svc{i % 2}|12:00:{i:02d} INFO request {i} took {i * 7}ms" for i in range(30)]


def _commentator(
    seed: int = 0, loaded: LoadedModel | None = None, sinks: int = 4, window: int = 92
) -> Commentator:
    return Commentator(
        loaded or tiny_loaded("llama", seed),
        CacheSettings(sinks=sinks, window=window, max_chunk=32),
        CommentaryPolicy(every_records=4, max_new_tokens=5),
        Prompt(instruction="Watch."),
    )


def _run(path: Path, state: Path, commentator: Commentator | None = None, **process) -> tuple:
    output = ListOutput()
    runner = Runner(
        commentator or _commentator(),
        FileSource(str(path), LineKeys(separator="|")),
        output,
        LocalDirStore(state),
        RunSettings(CheckpointSchedule(every_records=7), ProcessSettings(**process)),
    )
    return runner.run(), output.items, runner


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_second_run_over_a_longer_file_continues_where_the_first_stopped(tmp_path: Path) -> None:
    whole = _write(tmp_path / "whole.log", [line.encode() for line in LINES])
    _, expected, _ = _run(whole, tmp_path / "one-go")

    state = tmp_path / "two-runs"
    _write(tmp_path / "log", [line.encode() for line in LINES[:13]])
    first_stats, first, _ = _run(tmp_path / "log", state)
    _write(tmp_path / "log", [line.encode() for line in LINES])
    second_stats, second, runner = _run(tmp_path / "log", state)

    assert second_stats.value("streamsink_restored_streams") == 2
    assert second_stats.value("streamsink_new_streams") == 0
    assert second_stats.value("streamsink_replayed_records") == 13
    sessions = runner.processor.sessions.values()
    assert sum(s.prefilled_tokens for s in sessions) < sum(s.tokens_seen for s in sessions)
    key = lambda c: (c.stream_id, c.seq, c.first_offset, c.last_offset, c.text)  # noqa: E731
    assert sorted(map(key, first + second)) == sorted(map(key, expected))


def test_bad_records_are_counted_logged_and_skipped(tmp_path: Path) -> None:
    good = [line.encode() for line in LINES[:8]]
    bad = [b"svc0|\xff\xfe not utf-8", b"svc0|   ", b"no separator here", b"svc1|" + b"y" * 5000]
    path = _write(tmp_path / "log", good[:4] + bad + good[4:])
    with capture_logs() as logs:
        stats, produced, _ = _run(path, tmp_path / "state", max_record_bytes=4096)
    for reason in ("invalid_utf8", "empty", "no_key", "too_large"):
        assert stats.value("streamsink_dead_letter_records", reason=reason) == 1
    assert stats.value("streamsink_records") == 8
    assert {entry["reason"] for entry in logs if entry["event"] == "record set aside"} == {
        "invalid_utf8",
        "empty",
        "no_key",
        "too_large",
    }
    assert [(c.stream_id, c.seq) for c in produced] == [("svc0", 0), ("svc1", 0)]


@pytest.mark.parametrize("policy", list(BadStatePolicy))
def test_state_of_another_model_follows_the_policy(tmp_path: Path, policy) -> None:
    path = _write(tmp_path / "log", [line.encode() for line in LINES[:8]])
    _run(path, tmp_path / "state")
    _write(tmp_path / "log", [line.encode() for line in LINES[:16]])
    with capture_logs() as logs:
        stats, produced, _ = _run(
            path, tmp_path / "state", commentator=_commentator(seed=1), on_bad_state=policy
        )
    assert stats.value("streamsink_bad_states", kind="foreign") == 2
    assert any("another model" in entry.get("error", "") for entry in logs)
    if policy is BadStatePolicy.RESTART:
        assert stats.value("streamsink_new_streams") == 2 and produced
    else:
        assert stats.value("streamsink_new_streams") == 0 and not produced
        assert stats.value("streamsink_dead_letter_records", reason="bad_state") == 16


# A reader that differs from the writer in one recorded setting, and how the refusal names it.
OTHER_READERS = {
    "dtype": (lambda: _commentator(loaded=tiny_variant("llama", torch.bfloat16)), "dtype="),
    "rope": (
        lambda: _commentator(
            loaded=tiny_variant("llama", rope_parameters={"rope_type": "linear", "factor": 2.0})
        ),
        "rope.factor=",
    ),
    "layer types": (
        lambda: _commentator(
            loaded=tiny_variant("llama", layer_types=["sliding_attention", "full_attention"])
        ),
        "layer_types[0]=",
    ),
    "sinks": (lambda: _commentator(sinks=2, window=94), "cache_sinks="),
}


@pytest.mark.parametrize("field", sorted(OTHER_READERS))
def test_state_written_with_other_settings_is_set_aside(tmp_path: Path, field: str) -> None:
    make_reader, named = OTHER_READERS[field]
    path = _write(tmp_path / "log", [line.encode() for line in LINES[:8]])
    _run(path, tmp_path / "state")
    _write(tmp_path / "log", [line.encode() for line in LINES[:16]])
    with capture_logs() as logs:
        stats, produced, _ = _run(path, tmp_path / "state", commentator=make_reader())
    assert stats.value("streamsink_bad_states", kind="foreign") == 2
    errors = [entry["error"] for entry in logs if entry["event"] == "unusable saved state"]
    assert len(errors) == 2 and all(named in error for error in errors)
    assert stats.value("streamsink_new_streams") == 0 and not produced
    assert stats.value("streamsink_dead_letter_records", reason="bad_state") == 16


def test_corrupt_state_is_reported_not_crashed_on(tmp_path: Path) -> None:
    path = _write(tmp_path / "log", [line.encode() for line in LINES[:8]])
    _run(path, tmp_path / "state")
    for block in (tmp_path / "state" / "blocks").rglob("*"):
        if block.is_file():
            block.write_bytes(block.read_bytes()[:-1] + b"!")
    stats, produced, _ = _run(path, tmp_path / "state")
    assert stats.value("streamsink_bad_states", kind="corrupt") == 2
    assert stats.value("streamsink_dead_letter_records", reason="bad_state") == 8
    assert stats.value("streamsink_new_streams") == 0 and not produced
