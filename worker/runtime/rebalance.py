"""kafka-python's rebalance callbacks, handed on: assigned, revoked and lost (KIP-429).

kafka-python 3 runs a listener on its event loop, the loop that also sends the heartbeats:
a sync listener that waits blocks them, and a long enough wait costs the worker its place in
the group while it still processes the partitions. So the listener is async: kafka-python
awaits it, and a revoke is awaited as a Handoff, a kafka-python Future the inference thread
resolves once the revoked partitions are checkpointed. Heartbeats go on meanwhile, and the
next owner gets the partitions complete.
"""

from __future__ import annotations

import threading
from typing import Protocol

import structlog
from kafka import TopicPartition
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.future import Future

log = structlog.get_logger("streamsink.worker")


class Handoff:
    """A revoke the inference thread finishes; resolved True by `set`, or False by a timer
    after `timeout` seconds, so the rebalance never waits on a stuck inference thread.

    The loop notices a resolution at its next turn (a heartbeat interval at the latest).
    """

    def __init__(self, timeout: float) -> None:
        self.finished = Future()
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._resolve, args=(False,))
        self._timer.daemon = True
        self._timer.start()

    def set(self) -> None:
        """Called by the inference thread once the revoked partitions are checkpointed."""
        self._timer.cancel()
        self._resolve(True)

    def _resolve(self, in_time: bool) -> None:
        with self._lock:
            if not self.finished.is_done:
                self.finished.success(in_time)


class RebalanceHandler(Protocol):
    def on_assigned(self, added: set[TopicPartition]) -> None: ...

    def on_revoked(self, revoked: set[TopicPartition]) -> Handoff | None:
        """Start the revoke; what to wait for, if anything."""

    def on_lost(self, lost: set[TopicPartition]) -> None: ...


class RebalanceListener(AsyncConsumerRebalanceListener):
    """Each kind of change to its own handler method, awaited off the heartbeats' way."""

    def __init__(self, handler: RebalanceHandler) -> None:
        self.handler = handler

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.handler.on_assigned(set(assigned))

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        handoff = self.handler.on_revoked(set(revoked))
        if handoff is not None and not await handoff.finished:
            log.error(
                "revoked partitions not checkpointed in time",
                partitions=sorted(p.partition for p in revoked),
            )

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.handler.on_lost(set(lost))
