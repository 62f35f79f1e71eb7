"""Incremental checkpoints on a tiny model: a stream restored from them goes on exactly as one
that never moved.

Many checkpoints, each carrying only what changed, across ring turns and evictions (a cache
of 384 tokens turns every few commentaries); new owners that restore and checkpoint at once; failed
commits, whose slots the next checkpoint still carries; a state deleted under a running stream,
which the next checkpoint saves whole again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cache_store.local import LocalDirStore
from cache_store.memory_partition import MemoryPartitionStore
from cache_store.store import StateStore
from tests.models.checkpoint_harness import (
    RecordingDelivery,
    checkpointer,
    records,
    tiny_commentator,
)
from worker.model.cache_settings import CacheSettings
from worker.ops.metrics import WorkerMetrics
from worker.runtime.partition_checkpointer import PartitionCheckpointer
from worker.stream.commentator import Commentator
from worker.stream.processor import StreamProcessor
from worker.stream.records import Record
from worker.stream.session import StreamSession

RECORDS = records(0, 96)  # two streams, 48 records each: their rings turn many times
BATCH = 2  # a record of each stream
CAPACITY = 384  # a commentary turn (record, question, answer) writes about 110 slots


@pytest.fixture(scope="module")
def commentator() -> Commentator:
    tiny = tiny_commentator()
    settings = CacheSettings(sinks=4, window=CAPACITY - 4, max_chunk=32)
    return Commentator(tiny.loaded, settings, tiny.policy, tiny.prompt)


@pytest.fixture(scope="module")
def reference(commentator: Commentator) -> tuple[list[tuple[str, int, str]], StreamProcessor]:
    """The commentary and the final sessions of a run that never moved or saved."""
    processor = StreamProcessor(commentator, lambda stream_id: None, WorkerMetrics())
    produced = []
    for first in range(0, len(RECORDS), BATCH):
        produced += processor.apply(RECORDS[first : first + BATCH]).commentary
    assert processor.sessions["svc0"].cache.layout.evicted_total > 4 * CAPACITY
    return [(c.stream_id, c.seq, c.text) for c in produced], processor


def test_takeovers_restore_exactly_from_incremental_checkpoints(commentator, reference) -> None:
    store, metrics, delivery = MemoryPartitionStore(), WorkerMetrics(), RecordingDelivery()
    owner = checkpointer(commentator, store, delivery, metrics)
    for index, first in enumerate(range(0, len(RECORDS), BATCH)):
        if index % 5 == 4:  # a new owner, fed again from the committed offset as Kafka would
            owner = checkpointer(commentator, store, delivery, metrics)
            if owner.next_offset < first:
                owner.apply(RECORDS[owner.next_offset : first])
        owner.apply(RECORDS[first : first + BATCH])
        if index % 5 == 4:  # right after a restore, only what the new owner wrote is carried
            for session in owner.processor.sessions.values():
                assert session.prefilled_tokens <= _carried(session) < CAPACITY
        before = metrics.value("streamsink_checkpoint_bytes")
        if index % 7 == 3:
            store.available = False
            assert not owner.checkpoint()
            store.available = True
            continue
        assert owner.checkpoint()
        if index > 0 and index % 7 != 4:  # not the first one, nor the one after a failure
            assert metrics.value("streamsink_checkpoint_bytes") - before < _whole(owner) / 2
    assert delivery.delivered == reference[0]
    _assert_same_sessions(owner.processor, reference[1])
    _assert_same_sessions(_restored(commentator, owner.lease.load), reference[1])


def test_restores_from_a_dir_store_are_exact_after_a_failed_save_and_a_deleted_state(
    commentator, reference, tmp_path: Path
) -> None:
    store = LocalDirStore(tmp_path / "state")
    processor = _processor(commentator, store)
    produced = []
    for index, first in enumerate(range(0, len(RECORDS), BATCH)):
        if index % 6 == 5:
            processor = _processor(commentator, store)
        produced += processor.apply(RECORDS[first : first + BATCH]).commentary
        if index == 9:  # an operator deletes the state, its blocks are collected
            assert store.delete("svc0") and store.collect_garbage() > 0
        if index == 13:
            with pytest.raises(OSError):
                processor.commit_changed(_failing_save)
            continue
        processor.commit_changed(lambda states: [store.save(state) for state in states])
    assert [(c.stream_id, c.seq, c.text) for c in produced] == reference[0]
    _assert_same_sessions(processor, reference[1])
    _assert_same_sessions(_restored(commentator, store.load), reference[1])


def _processor(commentator: Commentator, store: StateStore) -> StreamProcessor:
    def load(stream_id: str):
        return store.load(stream_id, commentator.loaded.fingerprint)

    return StreamProcessor(commentator, load, WorkerMetrics())


def _carried(session: StreamSession) -> int:
    """Slots the session's next snapshot would carry."""
    return sum(piece.stop - piece.start for piece in session.cache.pieces.plan().new)


def _whole(owner: PartitionCheckpointer) -> int:
    """Bytes of every stream's cache, whole."""
    sessions = owner.processor.sessions.values()
    return sum(layer.keys.nbytes * 2 for s in sessions for layer in s.cache.layers)


def _failing_save(states: list) -> None:
    assert states
    raise OSError("disk full")


def _restored(commentator: Commentator, load) -> StreamProcessor:
    """A processor whose sessions are restored from the last committed states."""
    processor = StreamProcessor(commentator, load, WorkerMetrics())
    for stream_id in ("svc0", "svc1"):
        processor.apply([Record(stream_id, 0, b"replayed, skipped")])
    return processor


def _assert_same_sessions(moved: StreamProcessor, still: StreamProcessor) -> None:
    assert moved.sessions.keys() == still.sessions.keys()
    for stream_id, session in still.sessions.items():
        other = moved.sessions[stream_id]
        wall_clock = {"last_commentary_time": None}  # when it commented, not what it said
        assert replace(other.counters, **wall_clock) == replace(session.counters, **wall_clock)
        assert other.cache.layout.to_meta() == session.cache.layout.to_meta()
        assert torch.equal(other.cache.token_ids, session.cache.token_ids)
        for a, b in zip(other.cache.layers, session.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
