"""What flows through the worker: input records in, commentary out."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from worker.exceptions import BadRecordError

DEFAULT_MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Record:
    """One input record: raw bytes as they arrived, not yet trusted."""

    stream_id: str | None
    offset: int
    value: bytes
    partition: int = 0


@dataclass(frozen=True)
class Commentary:
    """One piece of commentary; (stream_id, seq) identifies it, so a consumer can drop repeats."""

    stream_id: str
    seq: int
    first_offset: int
    last_offset: int
    text: str
    model: str
    time: float

    def to_json_dict(self) -> dict[str, object]:
        return asdict(self)


def decode_record(record: Record, max_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> str:
    """The record's text, or BadRecordError with a stable reason (no_key, too_large, ...)."""
    if not record.stream_id:
        raise BadRecordError("no_key", f"record at offset {record.offset} has no stream id (key)")
    if len(record.value) > max_bytes:
        raise BadRecordError(
            "too_large",
            f"record at offset {record.offset} has {len(record.value)} bytes, over the limit of "
            f"{max_bytes} (raise --max-record-bytes to accept it)",
        )
    try:
        text = record.value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecordError(
            "invalid_utf8", f"record at offset {record.offset} is not valid UTF-8: {error}"
        ) from error
    if not text.strip():
        raise BadRecordError("empty", f"record at offset {record.offset} is empty")
    return text
