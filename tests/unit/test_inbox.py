"""The inference thread's inbox: in order, except that a revoke or a loss overtakes."""

from __future__ import annotations

import queue
import threading

import pytest
from kafka import TopicPartition

from worker.runtime.inbox import Batch, Claim, Inbox, Lost, Revoke, Stop

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def _drain(inbox: Inbox) -> list:
    messages = []
    while inbox.qsize():
        messages.append(inbox.get(timeout=0))
    return messages


def test_a_revoke_goes_first_and_takes_back_the_queued_work_of_its_partitions() -> None:
    inbox, done = Inbox(), threading.Event()
    for message in (Claim(P0), Batch(P0, []), Claim(P1), Batch(P1, []), Batch(P0, [])):
        inbox.put(message)
    revoke = Revoke(frozenset({P0}), done)
    inbox.put(revoke)
    inbox.put(Claim(P0))  # assigned again after the revoke: it stays
    assert _drain(inbox) == [revoke, Claim(P1), Batch(P1, []), Claim(P0)]


def test_revokes_and_losses_keep_their_own_order() -> None:
    inbox, stop = Inbox(), Stop()
    inbox.put(stop)
    lost, revoke = Lost(frozenset({P1})), Revoke(frozenset({P0}), threading.Event())
    inbox.put(lost)
    inbox.put(revoke)
    assert _drain(inbox) == [lost, revoke, stop]


def test_get_waits_for_a_message_then_gives_up() -> None:
    inbox = Inbox()
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.01)
    threading.Timer(0.05, inbox.put, args=(Claim(P0),)).start()
    assert inbox.get(timeout=5) == Claim(P0)


def test_the_batches_queued_next_of_distinct_partitions_are_taken_together() -> None:
    inbox = Inbox()
    messages = [Batch(P0, []), Batch(P1, []), Batch(P0, []), Claim(P1), Batch(P1, [])]
    for message in messages:
        inbox.put(message)
    first = inbox.get(timeout=0)
    assert inbox.batches_next(first) == messages[:2]  # a second batch of P0 waits its turn
    first = inbox.get(timeout=0)
    assert inbox.batches_next(first) == [messages[2]]  # a claim is next after it
    assert inbox.get(timeout=0) == Claim(P1)
    inbox.put(Batch(P0, []))
    first = inbox.get(timeout=0)
    inbox.put(Lost(frozenset({TopicPartition("in", 2)})))
    assert inbox.batches_next(first) == [first]  # nothing is taken while a loss waits
