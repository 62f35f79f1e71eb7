"""The checkpoint protocol of one partition on a tiny model and the in-memory store.

Each test plays owners of one partition against each other, with the real StreamProcessor:
fencing, outbox replay, a takeover in the middle of a checkpoint, and a store outage.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from cache_store.memory_partition import MemoryLease, MemoryPartitionStore
from cache_store.partition import OutboxKind, SaveReport
from tests.models.checkpoint_harness import (
    SCOPE,
    RecordingDelivery,
    checkpointer,
    key_of,
    records,
    tiny_commentator,
    with_bad_record,
)
from worker.exceptions import CacheDamagedError
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointSchedule


@pytest.fixture(scope="module")
def commentator():
    return tiny_commentator()


@pytest.fixture
def store() -> MemoryPartitionStore:
    return MemoryPartitionStore()


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics()


def test_commit_then_deliver_then_hand_kafka_its_offset(commentator, store, metrics) -> None:
    delivery = RecordingDelivery()
    owner = checkpointer(commentator, store, delivery, metrics)
    owner.apply(records(0, 4))
    assert delivery.delivered == [] and owner.take_offset_to_commit() is None
    assert owner.checkpoint()
    assert sorted((s, q) for s, q, _ in delivery.delivered) == [("svc0", 0), ("svc1", 0)]
    partition = store.partitions[SCOPE]
    assert partition.next_offset == 4 and partition.outbox == []
    assert owner.take_offset_to_commit() == 4 and owner.take_offset_to_commit() is None
    assert metrics.value("streamsink_checkpoints") == 1
    successor = checkpointer(commentator, store, RecordingDelivery(), metrics)
    successor.apply(records(4, 4))
    assert metrics.value("streamsink_restored_streams") == 2


def test_nothing_is_due_when_nothing_changed(commentator, store, metrics) -> None:
    every_time = CheckpointSchedule(every_records=1000, every_seconds=0)
    owner = checkpointer(commentator, store, RecordingDelivery(), metrics, every_time)
    assert not owner.due()
    owner.apply(records(0, 2))
    assert owner.due()
    assert owner.checkpoint()
    assert not owner.due()


def test_due_by_records(commentator, store, metrics) -> None:
    owner = checkpointer(commentator, store, RecordingDelivery(), metrics)  # every 4 records
    owner.apply(records(0, 3))
    assert not owner.due()
    owner.apply(records(3, 1))
    assert owner.due()


def test_a_second_claim_fences_the_first_owner_off(commentator, store, metrics) -> None:
    delivery = RecordingDelivery()
    zombie = checkpointer(commentator, store, delivery, metrics)
    zombie.apply(records(0, 4))
    store.claim(SCOPE)  # another worker took the partition
    assert not zombie.checkpoint()
    assert zombie.fenced and not zombie.due() and not zombie.deliver()
    assert delivery.delivered == [] and delivery.buffered == []
    assert metrics.value("streamsink_fenced_writes") == 1
    assert zombie.take_offset_to_commit() is None
    partition = store.partitions[SCOPE]
    assert partition.next_offset is None and partition.outbox == []
    assert partition.states.list_streams() == []


def _commit_then_fail_delivery(commentator, store, metrics, batch: list) -> None:
    """An owner applies `batch` and commits it, then its delivery fails."""
    failing = RecordingDelivery()
    failing.fail = True
    owner = checkpointer(commentator, store, failing, metrics)
    owner.apply(batch)
    assert failing.buffered == []  # nothing is sent before the commit, dead letters included
    assert not owner.checkpoint()  # committed, then the delivery failed


def test_a_new_owner_replays_the_committed_outbox_without_regenerating(
    commentator, store, metrics
) -> None:
    _commit_then_fail_delivery(commentator, store, metrics, records(0, 4))
    assert metrics.value("streamsink_errors", kind="delivery") == 1
    committed = [key_of(entry.payload) for entry in store.partitions[SCOPE].outbox]
    assert len(committed) == 2 and store.partitions[SCOPE].next_offset == 4
    generated = metrics.value("streamsink_commentaries")

    delivery = RecordingDelivery()
    second = checkpointer(commentator, store, delivery, metrics)
    assert second.next_offset == 4
    assert second.replay_outbox()
    assert delivery.delivered == committed
    assert metrics.value("streamsink_replayed_outputs") == 2
    assert metrics.value("streamsink_redelivered_commentaries") == 2  # it may repeat them
    assert metrics.value("streamsink_commentaries") == generated
    assert store.partitions[SCOPE].outbox == []


def test_a_dead_letter_is_sent_once_committed_then_replayed_not_regenerated(
    commentator, store, metrics
) -> None:
    _commit_then_fail_delivery(commentator, store, metrics, with_bad_record(0, 5, bad=2))
    (dead,) = [e for e in store.partitions[SCOPE].outbox if e.kind is OutboxKind.DEAD_LETTER]
    assert (dead.stream_id, dead.seq, dead.payload) == (None, 2, b"no key at all")

    delivery = RecordingDelivery()
    second = checkpointer(commentator, store, delivery, metrics)
    assert second.replay_outbox()
    ((key, value, headers),) = delivery.dead_letters
    assert (key, value) == (None, b"no key at all")
    assert headers["streamsink.reason"] == b"no_key"
    assert headers["streamsink.source"] == b"in/0@2"
    assert metrics.value("streamsink_dead_letter_records", reason="no_key") == 1
    assert store.partitions[SCOPE].outbox == []


def test_a_takeover_between_commit_and_trim_fences_the_trim(commentator, store, metrics) -> None:
    taken: list = []
    delivery = RecordingDelivery(on_flush=lambda: taken.append(store.claim(SCOPE)))
    first = checkpointer(commentator, store, delivery, metrics)
    first.apply(records(0, 4))
    assert not first.checkpoint()
    assert first.fenced and metrics.value("streamsink_fenced_writes") == 1
    sent_by_first = delivery.delivered
    assert len(sent_by_first) == 2
    (lease,) = taken
    assert [key_of(entry.payload) for entry in lease.outbox] == sent_by_first
    assert len(store.partitions[SCOPE].outbox) == 2  # the trim was refused

    replayed = RecordingDelivery()
    second = checkpointer(commentator, store, replayed, metrics)
    assert second.replay_outbox()
    assert replayed.delivered == sent_by_first
    assert store.partitions[SCOPE].outbox == []


def test_an_outage_postpones_the_checkpoint_and_loses_nothing(commentator, store, metrics) -> None:
    delivery = RecordingDelivery()
    owner = checkpointer(commentator, store, delivery, metrics)
    owner.apply(records(0, 4))
    store.available = False
    assert not owner.checkpoint()
    assert not owner.fenced and delivery.delivered == []
    assert metrics.value("streamsink_errors", kind="redis_unavailable") == 1
    assert owner.take_offset_to_commit() is None
    owner.apply(records(4, 4))
    store.available = True
    assert owner.checkpoint()
    assert sorted((s, q) for s, q, _ in delivery.delivered) == [
        ("svc0", 0),
        ("svc0", 1),
        ("svc1", 0),
        ("svc1", 1),
    ]
    assert owner.take_offset_to_commit() == 8 and store.partitions[SCOPE].next_offset == 8
    successor = checkpointer(commentator, store, RecordingDelivery(), metrics)
    successor.apply(records(8, 2))
    assert metrics.value("streamsink_restored_streams") == 2
    assert metrics.value("streamsink_replayed_records") == 0


def test_release_retries_within_its_budget_then_gives_up(commentator, store, metrics) -> None:
    owner = checkpointer(commentator, store, RecordingDelivery(), metrics)
    owner.apply(records(0, 4))
    store.available = False
    with capture_logs() as logs:
        assert not owner.release(True, 0.05, threading.Event(), retry_seconds=0.01)
    assert metrics.value("streamsink_errors", kind="redis_unavailable") >= 2
    assert "partition released without its last checkpoint" in {e["event"] for e in logs}
    store.available = True
    assert owner.release(True, 0.05, threading.Event(), retry_seconds=0.01)
    assert store.partitions[SCOPE].next_offset == 4


def test_a_lost_partition_is_released_without_a_write(commentator, store, metrics) -> None:
    owner = checkpointer(commentator, store, RecordingDelivery(), metrics)
    owner.apply(records(0, 4))
    assert not owner.release(False, 1.0, threading.Event())
    assert store.partitions[SCOPE].next_offset is None
    assert metrics.value("streamsink_checkpoints") == 0


def test_a_trim_that_meets_an_outage_after_the_flush_sends_nothing_twice(
    commentator, store, metrics
) -> None:
    delivery = RecordingDelivery(on_flush=lambda: setattr(store, "available", False))
    owner = checkpointer(commentator, store, delivery, metrics)
    owner.apply(records(0, 4))
    assert not owner.checkpoint()  # delivered, then Redis went before the trim
    assert len(store.partitions[SCOPE].outbox) == 2
    delivery.on_flush, store.available = None, True
    assert owner.checkpoint()  # only the trim is done again
    assert sorted((s, q) for s, q, _ in delivery.delivered) == [("svc0", 0), ("svc1", 0)]
    assert store.partitions[SCOPE].outbox == []
    assert metrics.value("streamsink_redelivered_commentaries") == 0


def test_what_a_failed_flush_may_have_delivered_is_counted_when_sent_again(
    commentator, store, metrics
) -> None:
    delivery = RecordingDelivery()
    owner = checkpointer(commentator, store, delivery, metrics)
    owner.apply(records(0, 4))
    delivery.fail = True
    assert not owner.checkpoint()
    delivery.fail = False
    assert owner.checkpoint()
    assert len(delivery.delivered) == 2
    assert metrics.value("streamsink_redelivered_commentaries") == 2
    successor = checkpointer(commentator, store, RecordingDelivery(), metrics)
    assert successor.replay_outbox()  # nothing left to replay: the outbox was trimmed
    assert metrics.value("streamsink_redelivered_commentaries") == 2


@pytest.mark.parametrize("taken", [False, True], ids=["nothing-taken", "all-taken"])
def test_a_failed_flush_leaves_each_dead_letter_on_its_topic_once(
    commentator, store, metrics, taken
) -> None:
    delivery = RecordingDelivery()
    owner = checkpointer(commentator, store, delivery, metrics)
    owner.apply(with_bad_record(0, 5, bad=2))
    delivery.fail, delivery.taken = True, taken
    assert not owner.checkpoint()
    delivery.fail = False
    assert owner.checkpoint()
    assert [(key, value) for key, value, _ in delivery.dead_letters] == [(None, b"no key at all")]
    assert len(delivery.delivered) == (4 if taken else 2)  # commentary is sent again, counted
    assert metrics.value("streamsink_redelivered_commentaries") == 2
    assert metrics.value("streamsink_dead_letters_held_back") == (1 if taken else 0)


def test_a_takeover_after_the_flush_replays_commentary_but_no_dead_letter_twice(
    commentator, store, metrics
) -> None:
    delivery = RecordingDelivery(on_flush=lambda: store.claim(SCOPE))
    first = checkpointer(commentator, store, delivery, metrics)
    first.apply(with_bad_record(0, 5, bad=2))
    assert not first.checkpoint() and first.fenced  # delivered, then the trim was refused
    assert len(store.partitions[SCOPE].outbox) == 3
    delivery.on_flush = None
    second = checkpointer(commentator, store, delivery, metrics)
    assert second.replay_outbox()
    assert len(delivery.dead_letters) == 1
    assert len(delivery.delivered) == 4
    assert metrics.value("streamsink_redelivered_commentaries") == 2
    assert metrics.value("streamsink_dead_letters_held_back") == 1
    assert store.partitions[SCOPE].outbox == []


@dataclass(frozen=True)
class GatedLease:
    """A memory lease whose commits wait until `gate` is set, as a slow Redis would."""

    lease: MemoryLease
    gate: threading.Event

    def commit(self, states, next_offset, outbox=()) -> SaveReport:
        assert self.gate.wait(10)
        return self.lease.commit(states, next_offset, outbox)

    def trim_outbox(self, delivered: int) -> None:
        self.lease.trim_outbox(delivered)


def _delivered_keys(delivery: RecordingDelivery) -> list[tuple[str, int]]:
    return sorted((stream, seq) for stream, seq, _ in delivery.delivered)


def test_a_checkpoint_writes_while_the_next_batch_is_applied(commentator, store, metrics) -> None:
    """The snapshot is taken when the checkpoint starts; the write lands later, and records
    applied meanwhile wait for the next checkpoint. The output is the same as written in line."""
    gate, delivery = threading.Event(), RecordingDelivery()
    svc0_only = [r for r in records(4, 4) if r.stream_id == "svc0"]
    with ThreadPoolExecutor(max_workers=1) as writer:
        owner = checkpointer(commentator, store, delivery, metrics, writer=writer)
        owner.lease = GatedLease(owner.lease, gate)
        owner.apply(records(0, 4))
        owner.start_checkpoint()  # returns with the commit still waiting
        owner.apply(svc0_only)
        with pytest.raises(RuntimeError, match="changed since its state was saved"):
            owner.processor.evict("svc1")  # unchanged since, but its snapshot is not saved yet
        assert store.partitions[SCOPE].next_offset is None and delivery.delivered == []
        gate.set()
        assert owner.finish()
        assert store.partitions[SCOPE].next_offset == 4 and owner.take_offset_to_commit() == 4
        assert _delivered_keys(delivery) == [("svc0", 0), ("svc1", 0)]
        owner.processor.evict("svc1")  # saved now
        owner.apply([r for r in records(4, 4) if r.stream_id == "svc1"])
        assert owner.checkpoint() and store.partitions[SCOPE].next_offset == 8
    in_line_store, in_line = MemoryPartitionStore(), RecordingDelivery()
    alone = checkpointer(commentator, in_line_store, in_line, WorkerMetrics())
    for batch in (records(0, 4), svc0_only, [r for r in records(4, 4) if r.stream_id == "svc1"]):
        alone.apply(batch)
    assert alone.checkpoint()
    assert sorted(delivery.delivered) == sorted(in_line.delivered)
    assert len(delivery.delivered) == 4
    after = [RecordingDelivery(), RecordingDelivery()]
    for successor_store, successor_delivery in zip((store, in_line_store), after, strict=True):
        successor = checkpointer(commentator, successor_store, successor_delivery, metrics)
        successor.apply(records(8, 4))
        assert successor.checkpoint()
    assert after[0].delivered == after[1].delivered and len(after[0].delivered) == 2


def test_a_write_refused_in_flight_leaves_its_output_to_the_next_checkpoint(
    commentator, store, metrics
) -> None:
    delivery = RecordingDelivery()
    with ThreadPoolExecutor(max_workers=1) as writer:
        owner = checkpointer(commentator, store, delivery, metrics, writer=writer)
        owner.apply(records(0, 4))
        store.available = False
        owner.start_checkpoint()
        owner.apply(records(4, 4))
        assert not owner.finish() and not owner.fenced
        assert owner.take_offset_to_commit() is None
        store.available = True
        assert owner.checkpoint()
    assert _delivered_keys(delivery) == [("svc0", 0), ("svc0", 1), ("svc1", 0), ("svc1", 1)]
    assert owner.take_offset_to_commit() == 8 and store.partitions[SCOPE].outbox == []
    assert metrics.value("streamsink_checkpoints") == 1


def test_a_stream_dropped_while_its_snapshot_is_written_resumes_from_that_snapshot(
    commentator, store, metrics, monkeypatch
) -> None:
    """Its next record waits for the write in flight and restores what it committed, rather
    than finding no state yet and starting the stream over (seq 0 again)."""
    gate = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as writer:
        owner = checkpointer(commentator, store, RecordingDelivery(), metrics, writer=writer)
        owner.lease = GatedLease(owner.lease, gate)
        owner.apply(records(0, 4))  # svc1's offsets 1 and 3: its first commentary
        owner.start_checkpoint()
        damaged, prefill = owner.processor.sessions["svc1"].cache, commentator.decoder.prefill

        def failing(cache, tokens):
            if cache is damaged:
                raise CacheDamagedError("a forward failed half-way")
            return prefill(cache, tokens)

        monkeypatch.setattr(commentator.decoder, "prefill", failing)
        svc1 = [r for r in records(4, 6) if r.stream_id == "svc1"]  # offsets 5, 7 and 9
        owner.apply(svc1[:2])  # the turn they close fails: the stream is dropped
        monkeypatch.undo()
        assert "svc1" not in owner.processor.sessions
        threading.Timer(0.2, gate.set).start()  # the commit lands a moment later
        owner.apply(svc1[2:])
        assert owner.finish()
    resumed = owner.processor.sessions["svc1"]
    assert metrics.value("streamsink_restored_streams") == 1
    assert metrics.value("streamsink_new_streams") == 2  # svc0 and svc1, once each
    assert (resumed.counters.next_offset, resumed.counters.next_seq) == (10, 1)
