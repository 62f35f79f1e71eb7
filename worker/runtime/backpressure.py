"""Which assigned partitions may fetch: claimed ones, and none while inference is behind.

Pausing keeps a partition's position and its place in the group, so the polling thread can
go on polling (and heartbeating) however slow a model step is.
"""

from __future__ import annotations

import threading

from kafka import KafkaConsumer, TopicPartition


class PartitionGate:
    """The claimed partitions, and whether backpressure holds them all paused.

    The claimed set is also changed by the rebalance listener; its lock is never held across
    a consumer call, since the consumer's own IO thread may be the one waiting for it.
    """

    def __init__(self, max_queued_batches: int) -> None:
        self.max_queued_batches = max_queued_batches
        self._claimed: set[TopicPartition] = set()
        self._lock = threading.Lock()
        self._backpressure = False

    def is_open(self, partition: TopicPartition) -> bool:
        with self._lock:
            return partition in self._claimed

    def open(self, consumer: KafkaConsumer, partition: TopicPartition) -> None:
        """A claimed partition, sought to where its state stops: let it flow."""
        with self._lock:
            self._claimed.add(partition)
        if not self._backpressure:
            consumer.resume(partition)

    def close(self, partitions: set[TopicPartition]) -> None:
        """Revoked or lost partitions: their batches go nowhere from now on."""
        with self._lock:
            self._claimed -= partitions

    def pause_unclaimed(self, consumer: KafkaConsumer) -> None:
        """Fetch nothing for a new partition until its claim says where its state stops."""
        assigned, paused = consumer.assignment(), consumer.paused()
        with self._lock:
            unclaimed = assigned - self._claimed - paused
        if unclaimed:
            consumer.pause(*unclaimed)

    def apply_backpressure(self, consumer: KafkaConsumer, queued: int) -> None:
        """Pause everything at `max_queued_batches` waiting batches; resume at half of it."""
        with self._lock:
            claimed = list(self._claimed)
        if not self._backpressure and queued >= self.max_queued_batches:
            self._backpressure = True
            consumer.pause(*claimed)
        elif self._backpressure and queued <= self.max_queued_batches // 2:
            self._backpressure = False
            consumer.resume(*claimed)
