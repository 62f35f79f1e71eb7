"""The inference thread's messages, and the inbox that orders them.

Messages come in the order the polling thread saw things happen (claim, batches, stop),
except revokes and losses: a partition that is gone must stop being applied at once. So a
revoke or a loss goes ahead of everything queued, and takes back the queued claims and
batches of its partitions: a batch fetched before the revoke would only be applied to be
thrown away (and hold the rebalance up), and a claim would take a partition back from its
new owner.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import structlog
from kafka import TopicPartition

from worker.stream.records import Record

log = structlog.get_logger("streamsink.worker")


@dataclass(frozen=True)
class Claim:
    partition: TopicPartition


@dataclass(frozen=True)
class Batch:
    partition: TopicPartition
    records: list[Record]


class Done(Protocol):
    """Set once the revoked partitions are checkpointed (a threading.Event, a Handoff)."""

    def set(self) -> None: ...


@dataclass(frozen=True)
class Revoke:
    partitions: frozenset[TopicPartition]
    done: Done


@dataclass(frozen=True)
class Lost:
    partitions: frozenset[TopicPartition]


class Stop:
    pass


Message = Claim | Batch | Revoke | Lost | Stop


def _another_partition(message: Message, batches: list[Batch]) -> bool:
    """Whether `message` is a batch of a partition none of `batches` is of."""
    return isinstance(message, Batch) and all(b.partition != message.partition for b in batches)


class Inbox:
    """A queue of messages in which revokes and losses overtake; see the module docstring."""

    def __init__(self) -> None:
        self._urgent: deque[Revoke | Lost] = deque()
        self._queued: deque[Message] = deque()
        self._changed = threading.Condition()

    def put(self, message: Message) -> None:
        with self._changed:
            if isinstance(message, Revoke | Lost):
                self._withdraw(message.partitions)
                self._urgent.append(message)
            else:
                self._queued.append(message)
            self._changed.notify()

    def get(self, timeout: float) -> Message:
        """The next message; queue.Empty if none comes within `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(self.qsize, timeout):
                raise queue.Empty
            return (self._urgent or self._queued).popleft()

    def batches_next(self, first: Batch) -> list[Batch]:
        """`first` and the batches queued next, each of another partition, taken at once
        (none while a revoke or a loss waits): the inference thread applies them together."""
        taken = [first]
        with self._changed:
            while not self._urgent and self._queued and _another_partition(self._queued[0], taken):
                taken.append(self._queued.popleft())
        return taken

    def qsize(self) -> int:
        return len(self._urgent) + len(self._queued)

    def _withdraw(self, partitions: frozenset[TopicPartition]) -> None:
        kept = deque(
            message
            for message in self._queued
            if not (isinstance(message, Claim | Batch) and message.partition in partitions)
        )
        if len(kept) < len(self._queued):
            log.info(
                "queued work of a partition that is gone dropped",
                partitions=sorted(p.partition for p in partitions),
                messages=len(self._queued) - len(kept),
            )
        self._queued = kept
