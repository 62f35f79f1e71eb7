"""The inference thread's loop, run in the test's thread from a scripted inbox.

What it owns and drops per partition, and the replies the polling thread acts on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import pytest
from kafka import TopicPartition

from cache_store.memory_partition import MemoryPartitionStore
from tests.models.checkpoint_harness import (
    SCOPE,
    RecordingDelivery,
    ScriptedInbox,
    records,
    tiny_commentator,
    with_bad_record,
)
from worker.io.topics import TopicNames
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.inbox import Batch, Claim, Inbox, Lost, Revoke, Stop
from worker.runtime.inference_loop import CommitOffset, Fenced, InferenceLoop, Progress, Ready
from worker.runtime.kafka_settings import GroupSettings, WorkerSettings

PARTITION = TopicPartition("in", 0)  # claimed as SCOPE


@pytest.fixture(scope="module")
def commentator():
    return tiny_commentator()


class SlowClaims(MemoryPartitionStore):
    """Each claim waits until `proceed` is set: what the loop is sent meanwhile queues up."""

    def __init__(self) -> None:
        super().__init__()
        self.claiming, self.proceed = threading.Event(), threading.Event()

    def claim(self, scope: str):
        self.claiming.set()
        self.proceed.wait(10)
        return super().claim(scope)


def _loop(commentator, store, inbox) -> tuple[InferenceLoop, RecordingDelivery, queue.Queue]:
    delivery, replies = RecordingDelivery(), queue.Queue()
    settings = WorkerSettings(
        TopicNames("in", "out"), GroupSettings(shutdown_seconds=1.0), CheckpointSchedule(4, 3600)
    )
    loop = InferenceLoop(commentator, store, delivery, settings, WorkerMetrics(), inbox, replies)
    return loop, delivery, replies


WRITTEN = "the checkpoint writes started so far have ended"  # a step of a script


def _run(commentator, store, *steps: object | Callable[[], object]) -> tuple:
    """Run the loop over the script; returns its replies, delivery and metrics."""
    inbox = ScriptedInbox()
    loop, delivery, replies = _loop(commentator, store, inbox)
    ended = lambda: loop.writer.submit(int).result()  # noqa: E731 - the writer runs in order
    inbox.steps = [ended if step is WRITTEN else step for step in steps]
    loop.run()
    assert loop.failure is None
    return list(replies.queue), delivery, loop.metrics


def test_applied_offsets_and_committed_offsets_are_reported(commentator) -> None:
    store = MemoryPartitionStore()
    replies, delivery, metrics = _run(
        commentator, store, Claim(PARTITION), Batch(PARTITION, records(0, 2)),
        Batch(PARTITION, records(2, 2)), Stop(),
    )  # fmt: skip
    assert replies == [
        Ready(PARTITION, None),
        Progress(PARTITION, 2),
        Progress(PARTITION, 4),
        CommitOffset(PARTITION, 4),
    ]
    assert len(delivery.delivered) == 2 and metrics.value("streamsink_checkpoints") == 1


def test_a_fenced_partition_is_dropped_with_nothing_delivered(commentator) -> None:
    store = MemoryPartitionStore()
    replies, delivery, metrics = _run(
        commentator, store, Claim(PARTITION), Batch(PARTITION, records(0, 2)),
        lambda: store.claim(SCOPE), Batch(PARTITION, records(2, 2)), WRITTEN,
        Batch(PARTITION, records(4, 2)), Stop(),
    )  # fmt: skip
    assert metrics.value("streamsink_fenced_writes") == 1
    assert metrics.value("streamsink_partitions_owned") == 0
    assert delivery.delivered == [] and store.partitions[SCOPE].next_offset is None
    assert not any(isinstance(r, CommitOffset) for r in replies)
    assert Progress(PARTITION, 6) not in replies  # the batch after the drop went nowhere


def test_a_partition_fenced_while_no_record_comes_is_no_longer_counted_owned(commentator) -> None:
    """The refused write is found on an idle turn: the gauge says so before anything else
    arrives."""
    store, inbox = MemoryPartitionStore(), ScriptedInbox()
    loop, _, replies = _loop(commentator, store, inbox)
    owned: list[float] = []

    def idle() -> None:
        raise queue.Empty

    def count_owned() -> None:
        owned.append(loop.metrics.value("streamsink_partitions_owned"))

    inbox.steps = [
        Claim(PARTITION), Batch(PARTITION, records(0, 2)), count_owned,
        lambda: store.claim(SCOPE), Batch(PARTITION, records(2, 2)),
        lambda: loop.writer.submit(int).result(), idle, count_owned, Stop(),
    ]  # fmt: skip
    loop.run()
    assert loop.failure is None
    assert Fenced(PARTITION) in list(replies.queue)
    assert owned == [1, 0]


def test_a_fenced_partition_claimed_again_resumes_from_its_committed_state(commentator) -> None:
    """The polling thread is told, and claims it again if the group left it here."""
    store = MemoryPartitionStore()
    replies, delivery, metrics = _run(
        commentator, store, Claim(PARTITION), Batch(PARTITION, records(0, 4)), WRITTEN,
        lambda: store.claim(SCOPE), Batch(PARTITION, records(4, 4)),
        Claim(PARTITION), Batch(PARTITION, records(4, 4)), Stop(),
    )  # fmt: skip
    fenced_at = replies.index(Fenced(PARTITION))
    assert Ready(PARTITION, 4) in replies[fenced_at:]  # resumes where the commit stopped
    assert metrics.value("streamsink_fenced_writes") == 1
    assert store.partitions[SCOPE].next_offset == 8
    seqs: dict[str, list[int]] = {}
    for stream, seq, _ in delivery.delivered:
        seqs.setdefault(stream, []).append(seq)
    assert seqs and all(got == list(range(len(got))) for got in seqs.values())


def test_a_revoke_checkpoints_and_says_so(commentator) -> None:
    store = MemoryPartitionStore()
    done = threading.Event()
    replies, delivery, metrics = _run(
        commentator, store, Claim(PARTITION), Batch(PARTITION, records(0, 3)),
        Revoke(frozenset({PARTITION}), done), Stop(),
    )  # fmt: skip
    assert done.is_set() and replies[-1] == CommitOffset(PARTITION, 3)
    assert store.partitions[SCOPE].next_offset == 3 and len(delivery.delivered) == 1
    assert metrics.value("streamsink_partitions_owned") == 0


def test_a_lost_partition_is_dropped_without_a_write(commentator) -> None:
    store = MemoryPartitionStore()
    replies, delivery, metrics = _run(
        commentator, store, Claim(PARTITION), Batch(PARTITION, records(0, 3)),
        Lost(frozenset({PARTITION})), Stop(),
    )  # fmt: skip
    assert store.partitions[SCOPE].next_offset is None and delivery.delivered == []
    assert metrics.value("streamsink_checkpoints") == 0
    assert metrics.value("streamsink_partitions_owned") == 0


def test_a_fenced_zombie_dead_letters_nothing(commentator) -> None:
    store = MemoryPartitionStore()
    replies, delivery, metrics = _run(
        commentator, store, Claim(PARTITION), lambda: store.claim(SCOPE),
        Batch(PARTITION, with_bad_record(0, 4, bad=1)), Stop(),
    )  # fmt: skip
    assert metrics.value("streamsink_fenced_writes") == 1
    assert delivery.buffered == [] and delivery.dead_letters == []
    assert metrics.value("streamsink_dead_letter_records", reason="no_key") == 1  # still counted


def test_a_bad_record_is_dead_lettered_once_however_often_it_is_processed(commentator) -> None:
    store = MemoryPartitionStore()
    batch = Batch(PARTITION, with_bad_record(0, 3, bad=1))  # not due: checkpoints every 4
    _, lost, _ = _run(
        commentator, store, Claim(PARTITION), batch, Lost(frozenset({PARTITION})), Stop()
    )
    _, owner, _ = _run(commentator, store, Claim(PARTITION), batch, Stop())
    assert lost.buffered == [] and lost.dead_letters == []  # never committed, never sent
    assert [(key, value) for key, value, _ in owner.dead_letters] == [(None, b"no key at all")]
    assert store.partitions[SCOPE].outbox == []


@pytest.mark.parametrize("gone", ["revoked", "lost"])
def test_a_partition_that_is_gone_is_not_applied_any_further(commentator, gone: str) -> None:
    store, inbox, done = SlowClaims(), Inbox(), threading.Event()
    loop, _, replies = _loop(commentator, store, inbox)
    thread = threading.Thread(target=loop.run)
    thread.start()
    inbox.put(Claim(PARTITION))
    assert store.claiming.wait(10)  # the loop waits in its claim while the rest arrives
    for first in (0, 2, 4):
        inbox.put(Batch(PARTITION, records(first, 2)))
    partitions = frozenset({PARTITION})
    inbox.put(Revoke(partitions, done) if gone == "revoked" else Lost(partitions))
    inbox.put(Stop())
    store.proceed.set()
    thread.join(30)
    assert loop.failure is None and not thread.is_alive()
    assert list(replies.queue) == [Ready(PARTITION, None)]  # no batch was applied
    assert loop.metrics.value("streamsink_records") == 0
    assert done.is_set() == (gone == "revoked")


def test_batches_of_several_partitions_queued_together_share_decode_steps(commentator) -> None:
    """Each partition's output is what it is applied alone; their turns ran in one step."""
    other = TopicPartition("in", 1)
    widths: list[int] = []
    decode = commentator.decoder.decode

    def recording(caches, tokens):
        widths.append(len(caches))
        return decode(caches, tokens)

    def run(*steps: object) -> list:
        _, delivery, _ = _run(commentator, MemoryPartitionStore(), *steps)
        return sorted(delivery.delivered)

    alone = run(Claim(PARTITION), Batch(PARTITION, records(0, 4)), Stop())
    alone += run(Claim(other), Batch(other, records(0, 4)), Stop())
    commentator.decoder.decode = recording
    try:
        together = run(
            Claim(PARTITION), Claim(other), Batch(PARTITION, records(0, 4)),
            Batch(other, records(0, 4)), Stop(),
        )  # fmt: skip
    finally:
        del commentator.decoder.decode
    assert together == sorted(alone) and len(together) == 4
    assert max(widths) == 4  # two streams of each partition in one forward
