"""Records in, commentary out, per stream: the processing the local and the Kafka runs share.

A processor owns the sessions of one group of streams (all of a local run, or one Kafka
partition's). It validates each record, opens or restores the record's stream, runs the
commentator, and remembers which streams changed since their state was last saved. Where states
are saved and where commentary goes is the caller's business.

With a budget of live streams (LiveBudget, shared by the processors of one worker), `admit`
says how much of a batch fits and drops the saved caches least recently used to make room;
a dropped stream is restored from its saved state when its next record comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

from cache_store.exceptions import (
    MissingBlocksError,
    StateCorruptError,
    StateError,
    StateForeignError,
)
from cache_store.partition import StoreUnavailableError
from cache_store.state import StreamState
from worker.exceptions import BadRecordError, StreamsinkError
from worker.model.scheduler import Job
from worker.ops.metrics import WorkerMetrics
from worker.stream.commentator import Commentator
from worker.stream.live_budget import LiveBudget
from worker.stream.process_settings import BadStatePolicy, ProcessSettings
from worker.stream.records import Commentary, Record, decode_record
from worker.stream.session import StreamSession
from worker.stream.session_state import forget_stored, mark_saved, restore, snapshot

log = structlog.get_logger("streamsink.processor")

StateLoader = Callable[[str], StreamState | None]
SetAside = tuple[Record, BadRecordError]  # a record the run could not apply, and why
LiveKey = tuple["StreamProcessor", str]  # a live cache in a budget the processors share
Committed = TypeVar("Committed")
T = TypeVar("T")


@dataclass(frozen=True)
class Saving:
    """Snapshots handed to a commit that has not ended, and the sessions they were taken of."""

    states: list[StreamState]
    sessions: dict[str, StreamSession]


@dataclass(frozen=True)
class Applied:
    commentary: list[Commentary]
    set_aside: list[SetAside]


class StreamProcessor:
    """Applies records to their streams' sessions; see the module docstring."""

    def __init__(
        self,
        commentator: Commentator,
        load_state: StateLoader,
        metrics: WorkerMetrics,
        settings: ProcessSettings = ProcessSettings(),
        live: LiveBudget[LiveKey] | None = None,
    ) -> None:
        self.commentator = commentator
        self.load_state = load_state
        self.metrics = metrics
        self.settings = settings
        self.live = LiveBudget(settings.max_live_streams) if live is None else live
        self.sessions: dict[str, StreamSession] = {}
        self.skipped_streams: set[str] = set()
        self.dirty: set[str] = set()  # changed since their last snapshot
        self.saving: Saving | None = None  # snapshots taken, their commit not ended
        # Waits until the commit of `saving` has ended (and says how): a stream dropped while
        # its snapshot is being saved is restored only from what that commit left.
        self.await_saving: Callable[[], object] = lambda: None

    def apply(self, batch: list[Record]) -> Applied:
        """Apply a batch in offset order: the commentary it produced, in order, and the records
        set aside (already logged and counted; the caller dead-letters them, or not).

        StoreUnavailableError if a stream's state could not be read (the store is out): no
        record of the batch is applied then (its set-aside ones are counted again on a retry).
        """
        [applied] = apply_together([(self, batch)])
        return applied

    def _prepare(self, batch: list[Record]) -> _Prepared:
        """Validate the batch's records and open their streams; each stream's job, not run."""
        grouped: dict[str, list[tuple[int, str]]] = {}
        set_aside: list[SetAside] = []
        for record in batch:
            text = self._accept(record, set_aside)
            if text is not None:
                grouped.setdefault(record.stream_id, []).append((record.offset, text))
        jobs = [
            _measured(
                self.sessions[stream_id],
                self.commentator.records_job(self.sessions[stream_id], records),
            )
            for stream_id, records in grouped.items()
        ]
        return _Prepared(self, batch, grouped, set_aside, jobs)

    def comment_on_timers(self) -> list[Commentary]:
        """Commentary of streams whose time trigger fired, for runs with --every-seconds."""
        if self.commentator.policy.every_seconds is None:
            return []
        stream_ids = list(self.sessions)
        jobs = [
            _measured(self.sessions[s], self.commentator.due_job(self.sessions[s]))
            for s in stream_ids
        ]
        produced = []
        for stream_id, outcome in zip(
            stream_ids, self.commentator.scheduler.run(jobs), strict=True
        ):
            if isinstance(outcome, StreamsinkError):
                self._drop_failed(stream_id, outcome)
                continue
            if outcome.result is not None:
                commentary = outcome.result
                self._count_commentary([commentary], outcome.seconds)
                produced.append(commentary)
                self.dirty.add(stream_id)
                self.live.used((self, stream_id))
        return produced

    def commit_changed(self, commit: Callable[[list[StreamState]], Committed]) -> Committed:
        """Snapshot the changed streams and `commit` them; once it returns, they are saved.

        A commit refused because the store lost blocks a snapshot named (an expired or
        deleted state) is made once more with whole states. Anything else `commit` raises
        leaves the streams changed, and their next snapshots carry what this one did.
        """
        try:
            return self._commit_taken(commit)
        except MissingBlocksError as error:
            log.warning("saved blocks gone: saving the streams whole", error=str(error))
            return self._commit_taken(commit)

    def _commit_taken(self, commit: Callable[[list[StreamState]], Committed]) -> Committed:
        saving = self.take_changed()
        try:
            committed = commit(saving.states)
        except BaseException as error:
            self.not_saved(blocks_lost=isinstance(error, MissingBlocksError))
            raise
        self.saved()
        return committed

    def take_changed(self) -> Saving:
        """Snapshots of the streams changed since the last ones taken, in stream id order, each
        carrying what changed since its last committed snapshot. Until `saved` or `not_saved`
        says how their commit ended, those streams count as unsaved (no cache of theirs may
        go), and no other snapshot is taken."""
        if self.saving is not None:
            raise RuntimeError("a commit of this processor's snapshots has not ended")
        sessions = {stream_id: self.sessions[stream_id] for stream_id in sorted(self.dirty)}
        self.dirty.clear()
        states = [snapshot(session, self.commentator) for session in sessions.values()]
        self.saving = Saving(states, sessions)
        return self.saving

    def saved(self) -> None:
        """The commit of the last snapshots taken returned: they are the streams' saved
        states."""
        assert self.saving is not None
        for session in self.saving.sessions.values():
            mark_saved(session)
        self.saving = None

    def not_saved(self, blocks_lost: bool = False) -> None:
        """The commit of the last snapshots taken failed: their streams are changed again (those
        still open), so the next snapshots carry what these did; with `blocks_lost` (the store
        lost blocks they named), whole."""
        assert self.saving is not None
        for stream_id, session in self.saving.sessions.items():
            if self.sessions.get(stream_id) is session:
                self.dirty.add(stream_id)
        if blocks_lost:
            for session in self.sessions.values():
                forget_stored(session)
        self.saving = None

    def is_unsaved(self, stream_id: str) -> bool:
        """Whether the stream's cache holds what no committed state has: changed, or being
        saved."""
        return stream_id in self.dirty or self._being_saved(stream_id)

    @property
    def has_unsaved(self) -> bool:
        return bool(self.dirty) or self.saving is not None

    def _being_saved(self, stream_id: str) -> bool:
        return self.saving is not None and stream_id in self.saving.sessions

    def admit(self, batch: list[Record]) -> int:
        """How many leading records of `batch` fit in the live budget now (all, without one).

        Saved caches are dropped to make room, least recently used first, this processor's
        or another's of the same budget. 0: the caches that would have to go are not saved;
        save them (a checkpoint) and ask again.
        """
        return admit_together([(self, batch)])

    def _live_keys(self, batch: list[Record]) -> list[LiveKey | None]:
        return [
            (self, r.stream_id) if r.stream_id and r.stream_id not in self.skipped_streams else None
            for r in batch
        ]

    def evict(self, stream_id: str) -> None:
        """Drop a saved stream's cache; its next record restores it from the saved state."""
        if self.is_unsaved(stream_id):
            raise RuntimeError(f"stream {stream_id!r} has changed since its state was saved")
        self._forget(stream_id)
        self.metrics.evicted_streams.inc()
        log.debug("stream evicted", stream_id=stream_id)

    def close(self) -> None:
        """Give up every session (the partition is gone), and their room in the budget."""
        for stream_id in list(self.sessions):
            self._forget(stream_id)
        self.dirty.clear()

    def _forget(self, stream_id: str) -> None:
        self.sessions.pop(stream_id)
        self.live.dropped((self, stream_id))
        self.metrics.live_streams.set(len(self.live))

    def _finish(
        self,
        stream_id: str,
        records: list[tuple[int, str]],
        outcome: Measured[list[Commentary]] | StreamsinkError,
        batch: list[Record],
        set_aside: list[SetAside],
    ) -> list[Commentary]:
        """Count a stream's step, or set its records aside if its engine work failed."""
        if isinstance(outcome, StreamsinkError):
            self._drop_failed(stream_id, outcome)
            failed = {offset for offset, _ in records}
            for record in batch:
                if record.stream_id == stream_id and record.offset in failed:
                    set_aside.append(
                        self._reject(record, BadRecordError("engine_error", str(outcome)))
                    )
            return []
        self._count_commentary(outcome.result, outcome.seconds)
        self.metrics.records.inc(len(records))
        self.metrics.tokens.inc(outcome.tokens)
        self.dirty.add(stream_id)
        return outcome.result

    def _drop_failed(self, stream_id: str, error: StreamsinkError) -> None:
        """Dropped unsaved: reloaded from its last saved state when it is next seen."""
        log.error("stream step failed", stream_id=stream_id, error=str(error))
        self._forget(stream_id)
        self.dirty.discard(stream_id)

    def _count_commentary(self, produced: list[Commentary], seconds: float) -> None:
        if not produced:
            return
        self.metrics.commentaries.inc(len(produced))
        for _ in produced:
            self.metrics.commentary_seconds.observe(seconds / len(produced))

    def _accept(self, record: Record, set_aside: list[SetAside]) -> str | None:
        """The record's text if it is to be applied now, else None (set aside or a repeat)."""
        try:
            text = decode_record(record, self.settings.max_record_bytes)
        except BadRecordError as error:
            set_aside.append(self._reject(record, error))
            return None
        session = self._session(record.stream_id)
        if session is None:
            skipped = BadRecordError("bad_state", f"stream {record.stream_id!r} is skipped")
            set_aside.append(self._reject(record, skipped))
            return None
        if record.offset < session.counters.next_offset:
            self.metrics.replayed_records.inc()
            return None
        return text

    def _session(self, stream_id: str) -> StreamSession | None:
        if stream_id in self.skipped_streams:
            return None
        if stream_id not in self.sessions:
            if self._being_saved(stream_id):
                self.await_saving()
            session = self._open(stream_id)
            if session is None:
                return None
            self.sessions[stream_id] = session
        self.live.used((self, stream_id))
        self.metrics.live_streams.set(len(self.live))
        return self.sessions[stream_id]

    def _open(self, stream_id: str) -> StreamSession | None:
        started = time.perf_counter()
        try:
            state = self.load_state(stream_id)
            if state is not None:
                session = restore(state, self.commentator)
                self.metrics.restore_seconds.observe(time.perf_counter() - started)
                self.metrics.restored_streams.inc()
                log.info(
                    "stream restored",
                    stream_id=stream_id,
                    tokens=session.tokens_seen,
                    next_offset=session.counters.next_offset,
                )
                return session
        except StoreUnavailableError:
            raise  # the state is not at fault: the caller applies the batch once the store answers
        except (StateError, KeyError, ValueError) as error:
            self.metrics.bad_states.labels(kind=_bad_state_kind(error)).inc()
            log.error(
                "unusable saved state",
                stream_id=stream_id,
                error=str(error),
                policy=str(self.settings.on_bad_state),
            )
            if self.settings.on_bad_state is BadStatePolicy.SKIP:
                self.skipped_streams.add(stream_id)
                return None
        session = self.commentator.new_session(stream_id)
        self.metrics.new_streams.inc()
        self.metrics.prefill_tokens.inc(session.prefilled_tokens)
        return session

    def _reject(self, record: Record, error: BadRecordError) -> SetAside:
        self.metrics.dead_letters.labels(reason=error.reason).inc()
        log.warning(
            "record set aside",
            reason=error.reason,
            error=str(error),
            stream_id=record.stream_id,
            partition=record.partition,
            offset=record.offset,
        )
        return record, error


@dataclass(frozen=True)
class Measured(Generic[T]):
    """A stream's job's result, the seconds from its start to its end (other streams' work
    shares them) and the tokens it fed the model."""

    result: T
    seconds: float
    tokens: int


def _measured(session: StreamSession, job: Job[T]) -> Job[Measured[T]]:
    """`job`, of `session`'s stream, measuring itself from its start to its end."""
    started, fed = time.perf_counter(), session.prefilled_tokens
    result = yield from job
    return Measured(result, time.perf_counter() - started, session.prefilled_tokens - fed)


@dataclass(frozen=True)
class _Prepared:
    """A processor's batch, validated, its streams open, their jobs not run yet."""

    processor: StreamProcessor
    batch: list[Record]
    grouped: dict[str, list[tuple[int, str]]]
    set_aside: list[SetAside]
    jobs: list[Job]

    def finish(self, outcomes: Sequence[Measured[list[Commentary]] | StreamsinkError]) -> Applied:
        produced: list[Commentary] = []
        for (stream_id, records), outcome in zip(self.grouped.items(), outcomes, strict=True):
            produced += self.processor._finish(
                stream_id, records, outcome, self.batch, self.set_aside
            )
        return Applied(produced, self.set_aside)


Work = Sequence[tuple[StreamProcessor, list[Record]]]  # batches of processors of one worker


def apply_together(work: Work) -> list[Applied]:
    """Apply each processor's batch, every stream of them in one scheduler run, so that the
    streams of several partitions share forwards; what each returns, as `apply` says.

    The processors share one commentator. StoreUnavailableError if a stream's state could not
    be read: no record of any batch is applied then.
    """
    prepared = [processor._prepare(batch) for processor, batch in work]
    outcomes = work[0][0].commentator.scheduler.run([job for p in prepared for job in p.jobs])
    applied, start = [], 0
    for part in prepared:
        applied.append(part.finish(outcomes[start : start + len(part.jobs)]))
        start += len(part.jobs)
    return applied


def admit_together(work: Work) -> int:
    """How many leading records of the batches, one after another, fit in the live budget the
    processors share now: `StreamProcessor.admit` over all of them."""
    keys = [key for processor, batch in work for key in processor._live_keys(batch)]
    admission = work[0][0].live.admit(keys, lambda key: not key[0].is_unsaved(key[1]))
    for owner, stream_id in admission.drop:
        owner.evict(stream_id)
    return admission.count


def _bad_state_kind(error: Exception) -> str:
    if isinstance(error, StateForeignError):
        return "foreign"
    if isinstance(error, StateCorruptError):
        return "corrupt"
    if isinstance(error, StateError):
        return type(error).__name__.removeprefix("State").removesuffix("Error").lower()
    return "invalid"
