"""kafka-python's rebalance callbacks, handed on: assigned, revoked and lost (KIP-429)."""

from __future__ import annotations

from typing import Protocol

from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener


class RebalanceHandler(Protocol):
    def on_assigned(self, added: set[TopicPartition]) -> None: ...

    def on_revoked(self, revoked: set[TopicPartition]) -> None: ...

    def on_lost(self, lost: set[TopicPartition]) -> None: ...


class RebalanceListener(ConsumerRebalanceListener):
    """Each kind of change to its own handler method; no logic here."""

    def __init__(self, handler: RebalanceHandler) -> None:
        self.handler = handler

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.handler.on_assigned(set(assigned))

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.handler.on_revoked(set(revoked))

    def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.handler.on_lost(set(lost))
