"""The run loop: source -> per-stream routing -> engine -> sink -> state store.

It sees only interfaces, so the local run (file, stdout, directory) and the distributed one
share every line of processing. Outputs are flushed before the state that covers them is
saved: a crash in between replays records and re-sends commentary with the same seq.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

import structlog

from cache_store.base import StateStore
from cache_store.exceptions import StateError
from worker.engine import Engine, StreamInput
from worker.exceptions import BadRecordError, StreamsinkError
from worker.records import DEFAULT_MAX_RECORD_BYTES, Record, decode_record
from worker.session import StreamSession
from worker.session_state import restore, snapshot
from worker.sinks import CommentarySink
from worker.sources import Source

log = structlog.get_logger("streamsink.runner")


class BadStatePolicy(StrEnum):
    """What to do with a stream whose saved state cannot be used (corrupt, another model)."""

    RESTART = "restart"  # start afresh from the current record; the bad state is replaced
    SKIP = "skip"  # leave the state alone and skip the stream's records in this run


@dataclass
class RunStats:
    records: int = 0
    commentaries: int = 0
    restored_streams: int = 0
    new_streams: int = 0
    checkpoints: int = 0
    checkpoint_bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class RunSettings:
    checkpoint_every_records: int = 256
    checkpoint_every_seconds: float = 30.0
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    on_bad_state: BadStatePolicy = BadStatePolicy.RESTART


class Runner:
    def __init__(
        self,
        engine: Engine,
        source: Source,
        sink: CommentarySink,
        store: StateStore,
        settings: RunSettings = RunSettings(),
    ) -> None:
        self.engine, self.source, self.sink, self.store = engine, source, sink, store
        self.settings = settings
        self.sessions: dict[str, StreamSession] = {}
        self.skipped_streams: set[str] = set()
        self.stats = RunStats()
        self._dirty: set[str] = set()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def run(self, stop: threading.Event | None = None) -> RunStats:
        try:
            for batch in self.source.batches():
                self._process(batch)
                self._comment_on_timers()
                if self._checkpoint_due():
                    self.checkpoint()
                if stop is not None and stop.is_set():
                    break
        finally:
            self.checkpoint()
            self.source.close()
        return self.stats

    def _process(self, batch: list[Record]) -> None:
        grouped: dict[str, list[tuple[int, str]]] = {}
        for record in batch:
            self.stats.records += 1
            text = self._accept(record)
            if text is not None:
                grouped.setdefault(record.stream_id, []).append((record.offset, text))
        for stream_id, records in grouped.items():
            session = self.sessions[stream_id]
            try:
                with structlog.contextvars.bound_contextvars(
                    stream_id=stream_id, offset=records[-1][0]
                ):
                    produced = self.engine.step([StreamInput(session, records)])
            except StreamsinkError as error:
                self._skip("engine_error", error, stream_id=stream_id)
                # Dropped unsaved: reloaded from its last saved state next time.
                self.sessions.pop(stream_id)
                self._dirty.discard(stream_id)
                continue
            self._emit(produced)
            self._dirty.add(stream_id)
            self._since_checkpoint += len(records)

    def _accept(self, record: Record) -> str | None:
        """The record's text if it is to be applied now, else None (counted and logged)."""
        try:
            text = decode_record(record, self.settings.max_record_bytes)
        except BadRecordError as error:
            self._skip(error.reason, error, stream_id=record.stream_id, offset=record.offset)
            return None
        session = self._session(record.stream_id)
        if session is None:
            self.stats.skipped["bad_state"] += 1
            return None
        if record.offset < session.counters.next_offset:
            self.stats.skipped["already_applied"] += 1
            return None
        return text

    def _session(self, stream_id: str) -> StreamSession | None:
        if stream_id in self.skipped_streams:
            return None
        if stream_id not in self.sessions:
            self.sessions[stream_id] = self._open(stream_id)
        return self.sessions.get(stream_id)

    def _open(self, stream_id: str) -> StreamSession | None:
        try:
            state = self.store.load(stream_id, self.engine.loaded.fingerprint)
            if state is not None:
                session = restore(state, self.engine)
                self.stats.restored_streams += 1
                log.info(
                    "stream restored",
                    stream_id=stream_id,
                    tokens=session.tokens_seen,
                    next_offset=session.counters.next_offset,
                )
                return session
        except (StateError, KeyError, ValueError) as error:
            self._skip("bad_state", error, stream_id=stream_id, policy=self.settings.on_bad_state)
            if self.settings.on_bad_state is BadStatePolicy.SKIP:
                self.skipped_streams.add(stream_id)
                return None
        self.stats.new_streams += 1
        return self.engine.new_session(stream_id)

    def _comment_on_timers(self) -> None:
        if self.engine.policy.every_seconds is None:
            return
        for stream_id, session in self.sessions.items():
            commentary = self.engine.comment_if_due(session)
            if commentary is not None:
                self._emit([commentary])
                self._dirty.add(stream_id)

    def _emit(self, produced: list) -> None:
        for commentary in produced:
            self.sink.emit(commentary)
            self.stats.commentaries += 1

    def _checkpoint_due(self) -> bool:
        s = self.settings
        return bool(self._dirty) and (
            self._since_checkpoint >= s.checkpoint_every_records
            or time.monotonic() - self._last_checkpoint >= s.checkpoint_every_seconds
        )

    def checkpoint(self) -> None:
        """Flush outputs, then save every changed stream's state."""
        self.sink.flush()
        for stream_id in sorted(self._dirty):
            report = self.store.save(snapshot(self.sessions[stream_id], self.engine))
            self.stats.checkpoint_bytes += report.bytes_written
        if self._dirty:
            self.stats.checkpoints += 1
        self._dirty.clear()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()

    def _skip(self, reason: str, error: Exception, **context: object) -> None:
        self.stats.skipped[reason] += 1
        log.warning("skipped", reason=reason, error=str(error), **context)
