"""A partition's checkpointer on a tiny model, an in-memory store and a recording delivery."""

from __future__ import annotations

import json
import time
from concurrent.futures import Executor

from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError

from cache_store.memory_partition import MemoryPartitionStore
from tests.models.tiny_models import tiny_loaded
from worker.io.kafka_output import SOURCE_HEADER
from worker.model.cache_settings import CacheSettings
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.inbox import Batch
from worker.runtime.partition_checkpointer import PartitionCheckpointer
from worker.stream.chat_format import Prompt
from worker.stream.commentator import Commentator
from worker.stream.policy import CommentaryPolicy
from worker.stream.processor import StreamProcessor
from worker.stream.records import Record
from worker.stream.session_state import expected_writer

SCOPE = "in/0"
EVERY_RECORDS = 2  # commentary after two records of a stream


def tiny_commentator(
    settings: CacheSettings = CacheSettings(sinks=4, window=92, max_chunk=32),
    policy: CommentaryPolicy = CommentaryPolicy(every_records=EVERY_RECORDS, max_new_tokens=3),
) -> Commentator:
    """A commentator on the tiny llama, with short turns: what the protocol tests stream."""
    return Commentator(tiny_loaded("llama"), settings, policy, Prompt(instruction="Watch."))


def records(first: int, count: int) -> list[Record]:
    """Alternating between two streams, so `count` records make count/2 per stream."""
    return [
        Record(f"svc{offset % 2}", offset, f"12:00:{offset:02d} request {offset}".encode())
        for offset in range(first, first + count)
    ]


def with_bad_record(first: int, count: int, bad: int) -> list[Record]:
    """`records(first, count)`, but the record at offset `bad` has no key: it is set aside."""
    return [
        Record(None, record.offset, b"no key at all") if record.offset == bad else record
        for record in records(first, count)
    ]


class RecordingDelivery:
    """Keeps what was flushed: commentary as (stream, seq, text), dead letters as (key, value,
    headers) and when; `fail` makes the next flushes fail, the outputs taking nothing, or with
    `taken`, everything (the acknowledgement lost)."""

    def __init__(self, on_flush=None) -> None:
        self.buffered: list[tuple[str, tuple]] = []
        self.delivered: list[tuple[str, int, str]] = []
        self.dead_letters: list[tuple[str | None, bytes, dict[str, bytes]]] = []
        self.stamps: list[int] = []  # when each dead letter was taken, Unix ms
        self.fail = self.taken = False
        self.on_flush = on_flush

    def send_commentary(self, stream_id: str, payload: bytes) -> None:
        self.buffered.append(("commentary", (payload,)))

    def send_dead_letter(self, key: str | None, value: bytes, headers) -> None:
        self.buffered.append(("dead_letter", (key, value, dict(headers))))

    def flush(self, timeout: float | None = None) -> None:
        if self.on_flush is not None:
            self.on_flush()
        if not self.fail or self.taken:
            for kind, sent in self.buffered:
                if kind == "commentary":
                    self.delivered.append(key_of(*sent))
                else:
                    self.dead_letters.append(sent)
                    self.stamps.append(time.time_ns() // 1_000_000)
        self.buffered = []
        if self.fail:
            raise KafkaTimeoutError("the output topic did not acknowledge in time")

    def settle(self, timeout: float | None = None) -> None:
        """Every send ended at its flush."""

    def dead_letters_since(self, since_ms: int, timeout: float) -> set[bytes]:
        return {
            headers[SOURCE_HEADER]
            for (_, _, headers), stamp in zip(self.dead_letters, self.stamps, strict=True)
            if stamp >= since_ms
        }


def key_of(payload: bytes) -> tuple[str, int, str]:
    record = json.loads(payload)
    return record["stream_id"], record["seq"], record["text"]


def checkpointer(
    commentator: Commentator,
    store: MemoryPartitionStore,
    delivery: RecordingDelivery,
    metrics: WorkerMetrics,
    schedule: CheckpointSchedule = CheckpointSchedule(every_records=4, every_seconds=3600),
    writer: Executor | None = None,
) -> PartitionCheckpointer:
    """A new owner of SCOPE: it claims the partition and restores from the lease; with a
    writer, its checkpoints write there."""
    lease = store.claim(SCOPE)
    processor = StreamProcessor(
        commentator,
        lambda stream_id: lease.load(stream_id, expected_writer(commentator)),
        metrics,
    )
    source = TopicPartition("in", 0)
    return PartitionCheckpointer(
        source, lease, processor, delivery, schedule, metrics, 1.0, writer=writer
    )


class ScriptedInbox:
    """Hands out messages in order; a callable in the script runs between two messages."""

    def __init__(self, *steps: object) -> None:
        self.steps = list(steps)

    def get(self, timeout: float) -> object:
        step = self.steps.pop(0)
        if callable(step) and not isinstance(step, type):
            step()
            return self.get(timeout)
        return step

    def batches_next(self, first: Batch) -> list[Batch]:
        """`first` and the batches scripted next, each of another partition, as the real
        inbox takes them."""
        taken = [first]
        while self.steps and isinstance(self.steps[0], Batch):
            if any(batch.partition == self.steps[0].partition for batch in taken):
                break
            taken.append(self.steps.pop(0))
        return taken
