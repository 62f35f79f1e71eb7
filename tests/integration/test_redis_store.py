"""The Redis state store against a real Redis server and a real three-node Redis Cluster:
fencing, outbox, block lifetimes, damage; TLS and passwords on the server."""

from __future__ import annotations

import socket
import subprocess
import uuid

import msgpack
import pytest
import torch

from cache_store.codec import encode_state
from cache_store.exceptions import MissingBlocksError, StateCorruptError, StateForeignError
from cache_store.partition import (
    FencedError,
    OutboxEntry,
    StoreRefusedError,
    StoreUnavailableError,
)
from cache_store.redis.scoped import ORPHAN_BLOCK_SECONDS
from cache_store.redis.store import RedisStore
from cache_store.state import StreamState
from tests.integration.services import RedisService

SCOPE = "input/3"


@pytest.fixture(params=["server", "cluster"])
def redis_target(request) -> RedisService:
    """The session's Redis server, then its Redis Cluster (started on first use)."""
    return request.getfixturevalue(
        "redis_service" if request.param == "server" else "redis_cluster_service"
    )


@pytest.fixture
def store(redis_target):
    store = redis_target.store(prefix=f"t{uuid.uuid4().hex[:8]}")
    yield store
    store.close()


def _state(stream_id: str, fill: float, fingerprint: str = "model-a") -> StreamState:
    tensors = {
        "layer0.keys.0": torch.full((2, 64, 8), fill, dtype=torch.bfloat16),
        "layer0.keys.1": torch.arange(1024, dtype=torch.float32).reshape(2, 64, 8),
        "token_ids": torch.arange(10),
    }
    return StreamState(stream_id, fingerprint, tensors, {"next_offset": int(fill)})


def _keys(store: RedisStore, pattern: str) -> set[str]:
    """The key names matching the pattern, on every node of a cluster."""
    return {key.decode() for key in store.client.scan_iter(match=f"{store.prefix}:{pattern}")}


def test_commit_then_load_is_exact_and_unchanged_blocks_are_reused(store) -> None:
    lease = store.claim(SCOPE)
    assert lease.epoch == 1 and lease.next_offset is None and lease.outbox == ()
    first = lease.commit([_state("s", 1.0)], next_offset=5)
    second = lease.commit([_state("s", 2.0)], next_offset=9)
    assert first.blocks_written == 3 and second.blocks_written == 1 and second.blocks_reused == 2
    loaded = lease.load("s", "model-a")
    assert loaded.meta == {"next_offset": 2}
    assert torch.equal(loaded.tensors["layer0.keys.0"], _state("s", 2.0).tensors["layer0.keys.0"])
    assert loaded.tensors["layer0.keys.0"].dtype == torch.bfloat16
    assert store.claim(SCOPE).next_offset == 9
    # The block of fill 1.0 is gone: only the blocks the manifest names remain.
    assert len(_keys(store, "{input/3}:b:s:*")) == 3
    assert store.load("s", "model-a") is not None and store.list_streams() == ["s"]


def test_a_commit_carries_what_changed_and_names_the_rest_until_a_named_block_is_gone(
    store,
) -> None:
    lease = store.claim(SCOPE)
    lease.commit([_state("s", 1.0)], next_offset=1)
    stored = lease.load("s").stored
    changed = {"layer0.keys.0": _state("s", 2.0).tensors["layer0.keys.0"]}
    report = lease.commit([StreamState("s", "model-a", changed, {}, stored=stored)], 2)
    assert report.blocks_written == 1 and report.blocks_reused == 2
    loaded = lease.load("s")
    for name, tensor in _state("s", 2.0).tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)
    assert len(_keys(store, "{input/3}:b:s:*")) == 3  # the block of fill 1.0 was dropped
    store.client.delete(f"{store.prefix}:{{input/3}}:b:s:{stored['token_ids'].block}")
    with pytest.raises(MissingBlocksError, match="save the streams whole"):
        lease.commit([StreamState("s", "model-a", changed, {"x": 1}, stored=stored)], 3)
    assert store.claim(SCOPE).next_offset == 2


def test_a_stale_epoch_is_fenced_off_and_changes_nothing(store) -> None:
    zombie = store.claim(SCOPE)
    zombie.commit([_state("s", 1.0)], next_offset=4)
    owner = store.claim(SCOPE)
    assert owner.epoch == zombie.epoch + 1 and owner.next_offset == 4
    with pytest.raises(FencedError, match="new owner"):
        zombie.commit([_state("s", 7.0)], 99, [OutboxEntry("s", 0, b"x")])
    with pytest.raises(FencedError):
        zombie.trim_outbox(1)
    assert owner.load("s").meta == {"next_offset": 1}
    again = store.claim(SCOPE)
    assert again.next_offset == 4 and again.outbox == ()
    # The zombie's blocks were written but never named: they expire on their own.
    orphans = [key for key in _keys(store, "{input/3}:b:s:*") if store.client.ttl(key) > 0]
    assert len(orphans) == 1 and store.client.ttl(orphans[0]) <= ORPHAN_BLOCK_SECONDS


def test_outbox_survives_until_trimmed_and_is_handed_to_the_next_owner(store) -> None:
    lease = store.claim(SCOPE)
    entries = [OutboxEntry("s", seq, f"text {seq}".encode()) for seq in range(3)]
    lease.commit([_state("s", 1.0)], 3, entries)
    lease.trim_outbox(2)
    assert store.claim(SCOPE).outbox == (entries[2],)


def test_dead_letters_share_the_outbox_and_old_entries_still_read(store) -> None:
    lease = store.claim(SCOPE)
    old = msgpack.packb(["s", 0, b"text 0"])  # an entry a worker of format 1 committed
    store.client.rpush(lease.states.keys(SCOPE).outbox, old)
    dead = OutboxEntry.dead_letter(
        "s", 9, b"\xff\xfe", [("streamsink.reason", b"invalid_utf8")], made_ms=1_700_000_000_000
    )
    lease.commit([], 10, [OutboxEntry("s", 1, b"text 1"), dead])
    assert store.claim(SCOPE).outbox == (
        OutboxEntry("s", 0, b"text 0"),
        OutboxEntry("s", 1, b"text 1"),
        dead,
    )


def test_idle_ttl_applies_to_the_manifest_and_every_block(redis_target) -> None:
    store = redis_target.store(prefix=f"t{uuid.uuid4().hex[:8]}", idle_ttl_seconds=50)
    store.claim(SCOPE).commit([_state("s", 1.0)], 1)
    ttls = [store.client.ttl(key) for key in _keys(store, "{input/3}:*:s*")]
    assert len(ttls) == 5 and all(0 < ttl <= 50 for ttl in ttls)
    assert 0 < store.info("s").ttl_seconds <= 50
    store.close()


def test_damaged_or_foreign_state_is_a_clear_error(store) -> None:
    lease = store.claim(SCOPE)
    lease.commit([_state("a", 1.0), _state("b", 1.0), _state("c", 1.0)], 1)
    with pytest.raises(StateForeignError, match="another model"):
        lease.load("a", "model-b")
    block = sorted(_keys(store, "{input/3}:b:b:*"))[0]
    store.client.setrange(block, 0, b"\x00\x01\x02")
    with pytest.raises(StateCorruptError, match="checksum"):
        lease.load("b", "model-a")
    manifest = f"{store.prefix}:{{input/3}}:m:c"
    store.client.set(manifest, store.client.get(manifest)[:40])
    with pytest.raises(StateCorruptError):
        lease.load("c", "model-a")


def test_delete_removes_the_stream_and_its_blocks(store) -> None:
    store.save(_state("s", 1.0))
    assert store.info("s").block_bytes > 0
    assert store.delete("s") and not store.delete("s")
    assert _keys(store, "{local}:*:s*") == set() and store.list_streams() == []


def test_a_commit_that_misreads_the_dropped_blocks_is_refused_and_changes_nothing(store) -> None:
    lease = store.claim(SCOPE)
    lease.commit([_state("s", 1.0)], 1)
    states = [_state("s", 2.0)]
    encoded = [encode_state(state) for state in states]
    keys = store.states.keys(SCOPE)
    store.states._prepare(keys, states, encoded)
    # Read as if the stream had no blocks yet: the block of fill 1.0 would be left behind.
    reply = store.states._run_commit(lease.epoch, keys, states, encoded, [set()], 2, ())
    assert reply == [b"stale", b"s"]
    assert lease.load("s").meta == {"next_offset": 1}
    owner = store.claim(SCOPE)
    assert owner.next_offset == 1
    assert owner.commit(states, 2).blocks_written == 0  # read again; the written block reused
    assert len(_keys(store, "{input/3}:b:s:*")) == 3


def test_partitions_spread_over_the_cluster_nodes_and_admin_sees_them_all(
    redis_cluster_service,
) -> None:
    store = redis_cluster_service.store(prefix=f"t{uuid.uuid4().hex[:8]}")
    scopes = [f"input/{partition}" for partition in range(8)]
    for scope in scopes:
        store.claim(scope).commit([_state(f"s{scope[-1]}", 1.0)], 1)
    holders = {}
    for scope in scopes:
        pattern = f"{store.prefix}:{{{scope}}}:*"
        holders[scope] = [
            node.name
            for node in store.client.get_primaries()
            if node.redis_connection.keys(pattern)
        ]
    assert all(len(nodes) == 1 for nodes in holders.values()), holders  # one slot each
    assert len({nodes[0] for nodes in holders.values()}) == 3, holders
    assert store.list_streams() == [f"s{partition}" for partition in range(8)]
    assert {store.info(f"s{p}").scope for p in range(8)} == set(scopes)
    assert store.delete("s5") and store.load("s5") is None and store.load("s6") is not None
    store.close()


def test_a_cluster_restart_loses_nothing_and_the_client_goes_on(redis_cluster_service) -> None:
    store = redis_cluster_service.store(prefix=f"t{uuid.uuid4().hex[:8]}")
    lease = store.claim(SCOPE)
    lease.commit([_state("s", 1.0)], 4, [OutboxEntry("s", 0, b"text 0")])
    redis_cluster_service.restart()
    assert lease.load("s").meta == {"next_offset": 1}
    lease.commit([_state("s", 2.0)], 8)
    again = store.claim(SCOPE)
    assert again.next_offset == 8 and again.outbox == (OutboxEntry("s", 0, b"text 0"),)
    store.close()


def test_the_wrong_client_or_no_cluster_is_a_clear_error(
    redis_service, redis_cluster_service
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    absent = RedisStore(f"redis://127.0.0.1:{closed}", cluster=True, retry_seconds=1)
    with pytest.raises(StoreUnavailableError, match="cannot be connected"):
        absent.ping()
    with pytest.raises(StoreRefusedError, match="Cluster mode is not enabled"):
        RedisStore(redis_service.url, cluster=True).ping()
    single = RedisStore(redis_cluster_service.url)  # a node's URL, without cluster=True
    with pytest.raises(StoreRefusedError, match="connect as a cluster client"):
        for partition in range(8):  # some of these live on another node than the URL's
            single.claim(f"input/{partition}")


def test_auth_password_is_used_and_a_refusal_is_a_clear_error(tmp_path) -> None:
    server = RedisService(tmp_path / "auth")
    server.start()
    try:
        server.client().config_set("requirepass", "s3cret")
        store = RedisStore(server.url, password="s3cret")
        store.save(_state("s", 1.0))
        assert store.load("s") is not None
        store.close()
        for password in (None, "wrong"):
            with pytest.raises(StoreRefusedError, match="refused the credentials"):
                RedisStore(server.url, password=password).ping()
        with_url = RedisStore(server.url.replace("redis://", "redis://:s3cret@"))
        assert with_url.list_streams() == ["s"]
        with_url.client.config_set("requirepass", "")  # so the script can stop it
    finally:
        server.stop()


def test_tls_urls_verify_the_server_certificate(tmp_path) -> None:
    """rediss:// with the server's CA works; without it the handshake is refused, clearly."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
         "--tls-ca-cert-file", str(tmp_path / "cert.pem"), "--tls-auth-clients", "no",
         "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        store = RedisStore(f"{url}?ssl_ca_certs={tmp_path / 'cert.pem'}", retry_seconds=5)
        store.save(_state("s", 1.0))
        assert store.list_streams() == ["s"]
        store.close()
        with pytest.raises(StoreUnavailableError, match="certificate verify failed"):
            RedisStore(url, retry_seconds=1).ping()
    finally:
        server.terminate()
        server.wait(10)
