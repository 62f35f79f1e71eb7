"""Many more streams than the budget of live caches, on a tiny model: the output is the one of
an unbounded run, every (stream, seq) text alike, and no more caches are live at any time.

The local run with the memory: and dir: stores; the Kafka inference loop with its fenced
checkpoints, one budget shared by two partitions, and a takeover after evictions.
"""

from __future__ import annotations

import queue
import random
from pathlib import Path

import pytest
from kafka import TopicPartition

from cache_store.local import LocalDirStore
from cache_store.memory import MemoryStore
from cache_store.memory_partition import MemoryPartitionStore
from cache_store.partition import StoreUnavailableError
from cache_store.store import StateStore
from tests.memory_outputs import ListOutput
from tests.models.checkpoint_harness import RecordingDelivery, ScriptedInbox, tiny_commentator
from worker.io.file_source import Source
from worker.io.topics import TopicNames
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.inbox import Batch, Claim, Stop
from worker.runtime.inference_loop import InferenceLoop
from worker.runtime.kafka_settings import GroupSettings, WorkerSettings
from worker.runtime.local_run import Runner, RunSettings
from worker.stream.live_budget import LiveBudget
from worker.stream.process_settings import ProcessSettings
from worker.stream.processor import StreamProcessor
from worker.stream.records import Record

STREAMS = [f"svc{i:02d}" for i in range(12)]
RECORDS = 60
BUDGET = 3
BATCH = 8
SCHEDULE = CheckpointSchedule(every_records=40, every_seconds=3600)


class WatchedBudget(LiveBudget):
    """A LiveBudget that remembers the most caches ever live at once."""

    peak = 0

    def used(self, key) -> None:
        super().used(key)
        self.peak = max(self.peak, len(self))


def _records(count: int, streams: list[str], seed: int = 7) -> list[Record]:
    """Records of streams picked at random (seeded): some streams come back soon, some late."""
    pick = random.Random(seed)
    return [
        Record(stream, offset, f"12:00:{offset % 60:02d} {stream} request {offset}".encode())
        for offset, stream in ((offset, pick.choice(streams)) for offset in range(count))
    ]


class ListSource(Source):
    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def batches(self):
        for first in range(0, len(self.records), BATCH):
            yield self.records[first : first + BATCH]


def _key(commentary) -> tuple:
    return commentary.stream_id, commentary.seq, commentary.first_offset, commentary.text


@pytest.fixture(scope="module")
def commentator():
    return tiny_commentator()


@pytest.fixture(scope="module")
def stream_records() -> list[Record]:
    return _records(RECORDS, STREAMS)


def _local_run(commentator, store: StateStore, budget: int | None, stream_records: list[Record]):
    output = ListOutput()
    settings = RunSettings(SCHEDULE, ProcessSettings(max_live_streams=budget))
    runner = Runner(commentator, ListSource(stream_records), output, store, settings)
    runner.processor.live = watched = WatchedBudget(budget)
    return runner.run(), output.items, watched.peak


@pytest.fixture(scope="module")
def unbounded_local(commentator, stream_records) -> list:
    return _local_run(commentator, MemoryStore(), None, stream_records)[1]


@pytest.mark.parametrize("store_kind", ["memory", "dir"])
def test_a_local_run_within_the_budget_writes_what_an_unbounded_one_does(
    commentator, stream_records, unbounded_local, tmp_path: Path, store_kind: str
) -> None:
    bounded_store = MemoryStore() if store_kind == "memory" else LocalDirStore(tmp_path)
    metrics, bounded, peak = _local_run(commentator, bounded_store, BUDGET, stream_records)

    assert len(unbounded_local) >= 20 and peak == BUDGET
    assert sorted(map(_key, bounded)) == sorted(map(_key, unbounded_local))
    assert metrics.value("streamsink_evicted_streams") >= 20
    assert metrics.value("streamsink_restored_streams") >= 20
    assert metrics.value("streamsink_new_streams") == len({r.stream_id for r in stream_records})
    assert metrics.value("streamsink_records") == len(stream_records)
    assert metrics.value("streamsink_live_streams") <= BUDGET
    assert metrics.summary()["evicted_streams"] == metrics.value("streamsink_evicted_streams")
    last_offsets = {record.stream_id: record.offset for record in stream_records}
    for stream_id, last in last_offsets.items():  # every record is in the saved states
        state = bounded_store.load(stream_id)
        assert state is not None and state.meta["counters"]["next_offset"] == last + 1


PARTITIONS = [TopicPartition("in", 0), TopicPartition("in", 1)]


def _partition_batches(stream_records: list[Record]) -> list[Batch]:
    """Each record goes to the partition of its stream (six streams each), BATCH at a time,
    the partitions' batches in turn; offsets count per partition."""
    by_partition: dict[TopicPartition, list[Record]] = {p: [] for p in PARTITIONS}
    for record in stream_records:
        partition = PARTITIONS[STREAMS.index(record.stream_id) % 2]
        offset = len(by_partition[partition])
        by_partition[partition].append(Record(record.stream_id, offset, record.value))
    return [
        Batch(partition, rs[first : first + BATCH])
        for first in range(0, len(stream_records), BATCH)
        for partition, rs in by_partition.items()
        if rs[first : first + BATCH]
    ]


def _kafka_run(
    commentator,
    store: MemoryPartitionStore,
    budget: int | None,
    batches: list,
    partitions: list[TopicPartition] = PARTITIONS,
):
    delivery = RecordingDelivery()
    settings = WorkerSettings(
        TopicNames("in", "out"),
        GroupSettings(shutdown_seconds=1.0),
        SCHEDULE,
        ProcessSettings(max_live_streams=budget),
    )
    script = ScriptedInbox(*(Claim(p) for p in partitions), *batches, Stop())
    loop = InferenceLoop(
        commentator, store, delivery, settings, WorkerMetrics(), script, queue.Queue()
    )
    loop.live = watched = WatchedBudget(budget)
    loop.run()
    assert loop.failure is None
    return loop.metrics, delivery, watched.peak


@pytest.fixture(scope="module")
def unbounded_kafka(commentator, stream_records) -> list:
    batches = _partition_batches(stream_records)
    return _kafka_run(commentator, MemoryPartitionStore(), None, batches)[1].delivered


def test_partitions_share_the_budget_and_write_what_an_unbounded_worker_does(
    commentator, stream_records, unbounded_kafka
) -> None:
    batches = _partition_batches(stream_records)
    store = MemoryPartitionStore()
    metrics, bounded, peak = _kafka_run(commentator, store, BUDGET, batches)

    assert len(unbounded_kafka) >= 20 and peak == BUDGET  # not BUDGET per partition
    assert sorted(bounded.delivered) == sorted(unbounded_kafka)
    assert len(set(bounded.delivered)) == len(bounded.delivered)  # each delivered once
    assert metrics.value("streamsink_evicted_streams") >= 20
    assert metrics.value("streamsink_restored_streams") >= 20
    assert metrics.value("streamsink_errors", kind="over_live_budget") == 0
    for partition in PARTITIONS:  # the committed offsets cover every record, as unbounded
        applied = sum(len(b.records) for b in batches if b.partition == partition)
        assert store.partitions[f"in/{partition.partition}"].next_offset == applied
        assert store.partitions[f"in/{partition.partition}"].outbox == []


def test_a_takeover_after_evictions_goes_on_from_the_committed_states(
    commentator, stream_records, unbounded_kafka
) -> None:
    store = MemoryPartitionStore()
    first = _partition_batches(stream_records[: RECORDS // 2])
    _, before, first_peak = _kafka_run(commentator, store, BUDGET, first)
    offsets = {p: store.partitions[f"in/{p.partition}"].next_offset for p in PARTITIONS}
    assert offsets == {p: sum(len(b.records) for b in first if b.partition == p) for p in offsets}
    rest = [
        Batch(b.partition, [r for r in b.records if r.offset >= offsets[b.partition]])
        for b in _partition_batches(stream_records)
    ]
    metrics, after, peak = _kafka_run(commentator, store, BUDGET, [b for b in rest if b.records])

    assert sorted(before.delivered + after.delivered) == sorted(unbounded_kafka)
    assert metrics.value("streamsink_replayed_records") == 0
    assert first_peak == peak == BUDGET


class RefusingStore(MemoryPartitionStore):
    """Refuses its next `refusals` calls (loads and commits alike): an outage that ends."""

    refusals = 0

    def check_available(self) -> None:
        if self.refusals:
            self.refusals -= 1
            raise StoreUnavailableError("the in-memory store refuses this call")
        super().check_available()


def test_an_outage_keeps_evicted_streams_waiting_not_set_aside(commentator) -> None:
    stream_records = _records(24, STREAMS[:4])
    batches = [Batch(PARTITIONS[0], stream_records[i : i + 6]) for i in range(0, 24, 6)]
    _, unbounded, _ = _kafka_run(
        commentator, MemoryPartitionStore(), None, batches, [PARTITIONS[0]]
    )
    store = RefusingStore()
    outage = lambda: setattr(store, "refusals", 3)  # noqa: E731
    metrics, bounded, peak = _kafka_run(
        commentator, store, 1, [*batches[:2], outage, *batches[2:]], [PARTITIONS[0]]
    )

    assert sorted(bounded.delivered) == sorted(unbounded.delivered)
    assert metrics.value("streamsink_errors", kind="redis_unavailable") == 3
    assert metrics.value("streamsink_bad_states") == 0
    assert metrics.value("streamsink_dead_letter_records") == 0
    assert store.partitions["in/0"].next_offset == len(stream_records)
    assert peak > 1  # over the budget while the store took no checkpoint
    assert metrics.value("streamsink_errors", kind="over_live_budget") >= 1


def test_only_a_saved_stream_leaves_memory(commentator) -> None:
    metrics = WorkerMetrics()
    settings = ProcessSettings(max_live_streams=1)
    processor = StreamProcessor(commentator, lambda stream_id: None, metrics, settings)
    processor.apply([Record("a", 0, b"one line")])
    arriving = [Record("b", 1, b"another line")]
    assert processor.admit(arriving) == 0  # a has changed since it was saved
    with pytest.raises(RuntimeError, match="changed since its state was saved"):
        processor.evict("a")
    processor.take_changed()
    processor.saved()  # as a commit that returned
    assert processor.admit(arriving) == 1
    assert list(processor.sessions) == [] and metrics.value("streamsink_evicted_streams") == 1
