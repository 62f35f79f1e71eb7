"""Commentary triggers and record validation, model-free."""

from __future__ import annotations

import pytest

from worker.exceptions import BadRecordError
from worker.stream.policy import CommentaryPolicy
from worker.stream.records import Record, decode_record


@pytest.mark.parametrize(
    ("policy", "records", "tokens", "seconds", "due"),
    [
        (CommentaryPolicy(every_records=3), 2, 500, 99.0, False),
        (CommentaryPolicy(every_records=3), 3, 1, 0.0, True),
        (CommentaryPolicy(every_records=None, every_tokens=40), 1, 39, 0.0, False),
        (CommentaryPolicy(every_records=None, every_tokens=40), 1, 40, 0.0, True),
        (CommentaryPolicy(every_records=None, every_seconds=2.0), 1, 1, 2.5, True),
        (CommentaryPolicy(every_records=None, every_seconds=2.0), 0, 0, 9.0, False),
    ],
)
def test_triggers(policy, records, tokens, seconds, due) -> None:
    assert policy.due(records, tokens, seconds) is due


def test_a_policy_without_any_trigger_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one commentary trigger"):
        CommentaryPolicy(every_records=None)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Record(None, 0, b"text"), "no_key"),
        (Record("s", 1, b"x" * 11), "too_large"),
        (Record("s", 2, b"caf\xc3"), "invalid_utf8"),
        (Record("s", 3, b" \t "), "empty"),
    ],
)
def test_bad_records_have_a_stable_reason_and_a_message(record: Record, reason: str) -> None:
    with pytest.raises(BadRecordError) as raised:
        decode_record(record, max_bytes=10)
    assert raised.value.reason == reason
    assert f"offset {record.offset}" in str(raised.value)


def test_a_good_record_decodes_to_its_text() -> None:
    assert decode_record(Record("s", 0, "déjà vu".encode())) == "déjà vu"
