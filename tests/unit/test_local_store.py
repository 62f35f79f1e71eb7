"""Store semantics (memory and local directory), incremental saves, damage, GC and crash safety."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cache_store import from_url
from cache_store.codec import block_id, encode_state
from cache_store.exceptions import StateCorruptError, StateForeignError
from cache_store.local import LocalDirStore
from cache_store.memory import MemoryStore
from cache_store.redis.store import RedisStore
from cache_store.state import StreamState
from cache_store.store import StateStore

FINGERPRINT = "0f" * 16


def _state(stream_id: str = "s1", step: int = 0, **tensors: torch.Tensor) -> StreamState:
    tensors = tensors or {
        "layer0.keys.0": torch.arange(16, dtype=torch.float32).reshape(2, 8).to(torch.bfloat16),
        "layer0.values.0": torch.ones(2, 8, dtype=torch.bfloat16),
        "token_ids": torch.arange(8),
    }
    return StreamState(stream_id, FINGERPRINT, tensors, {"step": step})


def _assert_same(loaded: StreamState | None, saved: StreamState) -> None:
    assert loaded is not None
    assert (loaded.stream_id, loaded.fingerprint, loaded.meta) == (
        saved.stream_id,
        saved.fingerprint,
        saved.meta,
    )
    assert list(loaded.tensors) == list(saved.tensors)
    for name, tensor in saved.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name].view(torch.uint8), tensor.view(torch.uint8))


def _block_files(root: Path) -> set[str]:
    return {path.name for path in (root / "blocks").glob("*/*")}


@pytest.fixture(params=["memory", "dir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    return MemoryStore() if request.param == "memory" else LocalDirStore(tmp_path / "state")


def test_absent_stream_loads_as_none(store: StateStore) -> None:
    assert store.load("nobody") is None


def test_saved_state_loads_bit_exactly(store: StateStore) -> None:
    state = _state()
    store.save(state)
    _assert_same(store.load("s1", FINGERPRINT), state)


def test_save_replaces_the_previous_state(store: StateStore) -> None:
    store.save(_state(step=1))
    newer = _state(step=2, x=torch.zeros(3))
    store.save(newer)
    _assert_same(store.load("s1"), newer)


def test_second_save_of_same_state_writes_no_block(store: StateStore) -> None:
    state = _state()
    first = store.save(state)
    second = store.save(state)
    assert (first.blocks_written, first.blocks_reused) == (3, 0)
    assert (second.blocks_written, second.blocks_reused) == (0, 3)
    assert second.bytes_written == len(encode_state(state).manifest)
    assert second.seconds >= 0


def test_one_changed_tensor_writes_exactly_one_block(store: StateStore) -> None:
    state = _state()
    store.save(state)
    changed = dict(state.tensors)
    changed["token_ids"] = torch.arange(1, 9)
    report = store.save(_state(step=1, **changed))
    assert (report.blocks_written, report.blocks_reused) == (1, 2)
    expected_bytes = 8 * 8 + len(encode_state(_state(step=1, **changed)).manifest)
    assert report.bytes_written == expected_bytes


def test_identical_tensors_in_one_state_store_one_block(store: StateStore) -> None:
    same = torch.full((4,), 7.0)
    report = store.save(_state(a=same, b=same.clone()))
    assert (report.blocks_written, report.blocks_reused) == (1, 0)
    assert torch.equal(store.load("s1").tensors["b"], same)


def test_list_and_delete(store: StateStore) -> None:
    for stream_id in ("b", "a", "c"):
        store.save(_state(stream_id))
    assert store.list_streams() == ["a", "b", "c"]
    assert store.delete("b") is True
    assert store.delete("b") is False
    assert store.list_streams() == ["a", "c"]
    assert store.load("b") is None
    _assert_same(store.load("c"), _state("c"))


@pytest.mark.parametrize(
    "stream_id", ["tenant/room/42", "../escape", "流/données é", "%2F already quoted", ".hidden"]
)
def test_any_stream_id_round_trips(store: StateStore, stream_id: str) -> None:
    state = _state(stream_id)
    store.save(state)
    assert store.list_streams() == [stream_id]
    _assert_same(store.load(stream_id), state)


def test_foreign_fingerprint_is_refused(store: StateStore) -> None:
    store.save(_state())
    with pytest.raises(StateForeignError, match=f"{FINGERPRINT}.*other-model"):
        store.load("s1", "other-model")


def test_memory_store_drops_blocks_no_state_needs() -> None:
    store = MemoryStore()
    kept = set(encode_state(_state("a")).blocks)
    store.save(_state("a"))
    store.save(_state("b", x=torch.zeros(2)))
    store.save(_state("b", x=torch.ones(2)))  # the zeros block is needed no more
    assert set(store.blocks) == kept | {block_id(torch.ones(2).numpy().tobytes())}
    store.delete("b")
    assert set(store.blocks) == kept


def test_files_follow_the_layout(tmp_path: Path) -> None:
    state = _state("a/b")
    LocalDirStore(tmp_path).save(state)
    for bid in encode_state(state).blocks:
        assert (tmp_path / "blocks" / bid[:2] / bid).is_file()
    assert [path.name for path in (tmp_path / "streams").iterdir()] == ["a%2Fb.manifest"]


def test_a_new_store_on_the_same_directory_sees_saved_states(tmp_path: Path) -> None:
    state = _state()
    LocalDirStore(tmp_path).save(state)
    reopened = LocalDirStore(tmp_path)
    assert reopened.list_streams() == ["s1"]
    _assert_same(reopened.load("s1"), state)


def _flip_first_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0x40]) + data[1:])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:10])


@pytest.mark.parametrize(
    ("damage", "problem"),
    [(_flip_first_byte, "fails its checksum"), (os.remove, "is missing"), (_truncate, "has 10")],
)
def test_damaged_block_file_is_corrupt(
    tmp_path: Path, damage: Callable[[Path], None], problem: str
) -> None:
    store = LocalDirStore(tmp_path)
    state = _state()
    store.save(state)
    bid = block_id(state.tensors["token_ids"].numpy().tobytes())
    damage(tmp_path / "blocks" / bid[:2] / bid)
    with pytest.raises(StateCorruptError, match=f"stream 's1'.*'token_ids' {problem}"):
        store.load("s1")


@pytest.mark.parametrize("damage", [_truncate, lambda path: path.write_bytes(b"\x00" * 64)])
def test_damaged_manifest_file_is_corrupt(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    store = LocalDirStore(tmp_path)
    store.save(_state())
    damage(tmp_path / "streams" / "s1.manifest")
    with pytest.raises(StateCorruptError, match="stream 's1' is corrupt"):
        store.load("s1")


def test_garbage_collection_removes_only_unreferenced_blocks(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    shared = torch.arange(4.0)
    store.save(_state("a", shared=shared, own=torch.zeros(3)))
    store.save(_state("b", shared=shared, own=torch.ones(3)))
    latest = _state("b", shared=shared, own=torch.full((3,), 2.0))
    store.save(latest)  # orphans ones(3)
    store.delete("a")  # orphans zeros(3); `shared` is still used by b
    assert len(_block_files(tmp_path)) == 4
    assert store.collect_garbage() == 2
    assert _block_files(tmp_path) == set(encode_state(latest).blocks)
    assert store.collect_garbage() == 0
    assert torch.equal(store.load("b").tensors["shared"], shared)


def test_save_collects_garbage_every_n_changes(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path, gc_every=2)
    store.save(_state(x=torch.zeros(2)))
    assert len(_block_files(tmp_path)) == 1
    store.save(_state(x=torch.ones(2)))  # second change: the zeros block goes
    assert _block_files(tmp_path) == set(encode_state(_state(x=torch.ones(2))).blocks)


def test_garbage_collection_keeps_everything_when_a_manifest_is_unreadable(
    tmp_path: Path,
) -> None:
    store = LocalDirStore(tmp_path)
    store.save(_state("a", x=torch.zeros(2)))
    store.save(_state("b", x=torch.ones(2)))
    (tmp_path / "streams" / "b.manifest").write_bytes(b"torn")
    store.delete("a")
    with pytest.raises(StateCorruptError, match="stream 'b'"):
        store.collect_garbage()
    assert len(_block_files(tmp_path)) == 2


def test_leftover_temp_files_are_ignored_then_collected(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    state = _state()
    store.save(state)
    bid = next(iter(encode_state(state).blocks))
    leftovers = [
        tmp_path / "streams" / ".s2.manifest.x1y2.tmp",
        tmp_path / "streams" / ".abc.tmp",
        tmp_path / "blocks" / bid[:2] / ".q7.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half a write")
    assert store.list_streams() == ["s1"]
    assert store.collect_garbage() == 0
    assert not any(path.exists() for path in leftovers)
    _assert_same(store.load("s1"), state)


def test_crash_before_the_manifest_rename_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDirStore(tmp_path)
    old = _state(step=1)
    store.save(old)

    replace = os.replace

    def crash_on_manifest(source: str, target: str | Path) -> None:
        if str(target).endswith(".manifest"):
            raise OSError("simulated crash")
        replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        store.save(_state(step=2, x=torch.zeros(5)))
    monkeypatch.undo()
    assert len(_block_files(tmp_path)) == 4  # the new block landed, no manifest names it
    _assert_same(store.load("s1"), old)
    assert store.list_streams() == ["s1"]
    assert not list((tmp_path / "streams").glob("*.tmp"))


def test_too_long_stream_id_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        LocalDirStore(tmp_path).save(_state("流" * 100))


def test_from_url_opens_the_named_store(tmp_path: Path) -> None:
    local = from_url(f"dir:{tmp_path / 'state'}")
    assert isinstance(local, LocalDirStore) and local.root == tmp_path / "state"
    assert isinstance(from_url("memory:"), MemoryStore)
    redis = from_url("rediss://:pw@localhost:6380/1", prefix="team")  # connects on first use
    assert isinstance(redis, RedisStore) and redis.prefix == "team"


@pytest.mark.parametrize("url", ["mysql://localhost", "dir:", "/plain/path", "memory:x"])
def test_from_url_lists_the_accepted_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="dir:PATH.*memory:.*redis://"):
        from_url(url)
