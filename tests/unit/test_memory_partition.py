"""The in-memory PartitionStore: epochs, fencing, the outbox, outages, exact states; and the
outbox entries' format every store shares."""

from __future__ import annotations

import msgpack
import pytest
import torch

from cache_store.exceptions import StateCorruptError, StateForeignError, StateVersionError
from cache_store.memory_partition import MemoryPartitionStore
from cache_store.partition import FencedError, OutboxEntry, OutboxKind, StoreUnavailableError
from cache_store.state import StreamState

SCOPE = "in/0"


def _state(stream_id: str, fill: float) -> StreamState:
    tensors = {"keys": torch.full((2, 8), fill, dtype=torch.bfloat16), "ids": torch.arange(4)}
    return StreamState(stream_id, "model-a", tensors, {"fill": fill})


def test_claim_bumps_the_epoch_and_hands_over_offset_and_outbox() -> None:
    store = MemoryPartitionStore()
    first = store.claim(SCOPE)
    assert (first.epoch, first.next_offset, first.outbox) == (1, None, ())
    entries = [OutboxEntry("s", seq, b"text %d" % seq) for seq in range(3)]
    report = first.commit([_state("s", 1.5)], 4, entries)
    assert report.blocks_written == 2 and report.bytes_written > 0
    first.trim_outbox(1)
    second = store.claim(SCOPE)
    assert (second.epoch, second.next_offset, second.outbox) == (2, 4, tuple(entries[1:]))


def test_states_go_through_the_codec_exactly() -> None:
    lease = MemoryPartitionStore().claim(SCOPE)
    lease.commit([_state("s", 1.5)], 1)
    loaded = lease.load("s", "model-a")
    assert loaded.meta == {"fill": 1.5} and loaded.tensors["keys"].dtype == torch.bfloat16
    assert torch.equal(loaded.tensors["keys"], _state("s", 1.5).tensors["keys"])
    assert lease.load("other") is None
    with pytest.raises(StateForeignError):
        lease.load("s", "model-b")


def test_a_stale_lease_is_fenced_and_changes_nothing() -> None:
    store = MemoryPartitionStore()
    zombie = store.claim(SCOPE)
    zombie.commit([_state("s", 1.0)], 2, [OutboxEntry("s", 0, b"a")])
    owner = store.claim(SCOPE)
    with pytest.raises(FencedError, match="new owner"):
        zombie.commit([_state("s", 9.0)], 99, [OutboxEntry("s", 1, b"b")])
    with pytest.raises(FencedError):
        zombie.trim_outbox(1)
    assert owner.load("s").meta == {"fill": 1.0}
    again = store.claim(SCOPE)
    assert again.next_offset == 2 and again.outbox == (OutboxEntry("s", 0, b"a"),)


def test_an_unavailable_store_refuses_everything_until_it_is_back() -> None:
    store = MemoryPartitionStore()
    lease = store.claim(SCOPE)
    store.available = False
    for call in (
        lambda: store.claim(SCOPE),
        lambda: lease.commit([_state("s", 1.0)], 1),
        lambda: lease.trim_outbox(0),
        lambda: lease.load("s"),
    ):
        with pytest.raises(StoreUnavailableError):
            call()
    store.available = True
    lease.commit([_state("s", 1.0)], 1)
    assert store.claim(SCOPE).next_offset == 1


def test_outbox_entries_of_both_kinds_round_trip_and_old_entries_still_unpack() -> None:
    commentary = OutboxEntry("s", 3, b'{"text": "ok"}')
    dead = OutboxEntry.dead_letter(
        None, 7, b"\xff raw", [("streamsink.reason", b"no_key")], made_ms=1_700_000_000_000
    )
    assert dead.kind is OutboxKind.DEAD_LETTER and commentary.kind is OutboxKind.COMMENTARY
    assert [OutboxEntry.unpack(entry.pack()) for entry in (commentary, dead)] == [commentary, dead]
    assert commentary.pack() == msgpack.packb(["s", 3, b'{"text": "ok"}'])  # what old workers read
    assert OutboxEntry.unpack(msgpack.packb(["s", 1, b"old"])) == OutboxEntry("s", 1, b"old")
    unstamped = {k: v for k, v in msgpack.unpackb(dead.pack()).items() if k != "made_ms"}
    assert OutboxEntry.unpack(msgpack.packb(unstamped)).made_ms == 0  # kept by newer entries only


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (msgpack.packb({"v": 3, "kind": "dead_letter"}), StateVersionError),
        (msgpack.packb({"v": 2, "kind": "telegram"}), StateVersionError),
        (msgpack.packb({"v": 2, "kind": "dead_letter"}), StateCorruptError),
        (msgpack.packb(["s", 1]), StateCorruptError),
        (b"\xc1", StateCorruptError),
    ],
)
def test_an_outbox_entry_of_unknown_format_is_refused_by_name(raw: bytes, error: type) -> None:
    with pytest.raises(error, match="outbox entry"):
        OutboxEntry.unpack(raw)
