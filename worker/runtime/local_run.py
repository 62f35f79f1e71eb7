"""The local run loop: source -> stream processor -> commentary output -> state store.

Outputs are flushed before the state that covers them is saved: a crash in between replays
records and re-sends commentary with the same seq. With a budget of live streams, a batch that
needs the room of unsaved streams is cut there: a checkpoint saves them, then they may go.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from cache_store.store import StateStore
from worker.io.file_source import Source
from worker.io.outputs import CommentaryOutput
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointClock, CheckpointSchedule
from worker.stream.commentator import Commentator
from worker.stream.process_settings import ProcessSettings
from worker.stream.processor import StreamProcessor
from worker.stream.records import Record
from worker.stream.session_state import expected_writer


@dataclass(frozen=True)
class RunSettings:
    schedule: CheckpointSchedule = CheckpointSchedule()
    process: ProcessSettings = ProcessSettings()


class Runner:
    def __init__(
        self,
        commentator: Commentator,
        source: Source,
        output: CommentaryOutput,
        store: StateStore,
        settings: RunSettings = RunSettings(),
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.source, self.output, self.store = source, output, store
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        writer = expected_writer(commentator)
        self.processor = StreamProcessor(
            commentator,
            lambda stream_id: store.load(stream_id, writer),
            self.metrics,
            settings.process,
        )
        self._clock = CheckpointClock(settings.schedule)

    def run(self, stop: threading.Event | None = None) -> WorkerMetrics:
        try:
            for batch in self.source.batches():
                self._apply(batch)
                self._emit(self.processor.comment_on_timers())
                if self._clock.due(bool(self.processor.dirty)):
                    self.checkpoint()
                if stop is not None and stop.is_set():
                    break
        finally:
            self.checkpoint()
            self.source.close()
        return self.metrics

    def _apply(self, batch: list[Record]) -> None:
        """Apply the batch in parts that fit the live budget, checkpointing between them."""
        while batch:
            admitted = self.processor.admit(batch)
            if not admitted:
                self.checkpoint()  # every stream is saved now: any of them may go
                admitted = self.processor.admit(batch)
            self._emit(self.processor.apply(batch[:admitted]).commentary)
            self._clock.count(admitted)
            batch = batch[admitted:]

    def _emit(self, produced: list) -> None:
        for commentary in produced:
            self.output.emit(commentary)

    def checkpoint(self) -> None:
        """Flush outputs, then save every changed stream's state."""
        self.output.flush()
        started = time.perf_counter()
        reports = self.processor.commit_changed(
            lambda states: [self.store.save(state) for state in states]
        )
        for report in reports:
            self.metrics.checkpoint_bytes.inc(report.bytes_written)
        if reports:
            self.metrics.checkpoints.inc()
            self.metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        self._clock.reset()
