"""Reading and committing the states of one scope, fenced on an owner's epoch or not.

Blocks are written before the commit with a short TTL, so the blocks of a commit that never
happens (a crash, a fenced zombie) expire by themselves; the commit makes the blocks it names
permanent (or gives them the stream's idle TTL) and deletes the ones the new manifest dropped,
which the client names (scripts.py says why). A state that names blocks without carrying them
(`StreamState.stored`) has them checked by the commit like the others; as no retry can bring
such a block back, its absence is a MissingBlocksError at once. A load fetches the blocks in
MGETs of about MGET_BYTES, pipelined where Redis is one server.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from cache_store.codec import (
    EncodedState,
    Manifest,
    check_fingerprint,
    decode_state,
    encode_state,
    read_manifest,
)
from cache_store.exceptions import MissingBlocksError, StateCorruptError
from cache_store.partition import FencedError, OutboxEntry
from cache_store.redis import scripts
from cache_store.redis.client import Client, LazyCluster, redis_errors
from cache_store.redis.keys import ScopeKeys, index_key
from cache_store.state import Expected, StreamState
from cache_store.store import SaveReport

ORPHAN_BLOCK_SECONDS = 3600  # life of a block no commit has named yet
COMMIT_ATTEMPTS = 3  # a block may expire, or a block set change, between the reads and a commit
MGET_BYTES = 8 * 2**20  # block bytes asked for in one MGET of a load


class ScopedStates:
    """The states of every scope under one key prefix; see the module docstring."""

    def __init__(self, client: Client, prefix: str, idle_ttl_seconds: int | None) -> None:
        self.client, self.prefix, self.idle_ttl_seconds = client, prefix, idle_ttl_seconds
        self._commit_script = client.register_script(scripts.COMMIT)
        self._trim_script = client.register_script(scripts.TRIM_OUTBOX)

    def keys(self, scope: str) -> ScopeKeys:
        return ScopeKeys(self.prefix, scope)

    def load(
        self, scope: str, stream_id: str, expected_fingerprint: str | Expected | None = None
    ) -> StreamState | None:
        """The stream's state in `scope`, or None; raises StateError on a bad state."""
        keys = self.keys(scope)
        with redis_errors():
            raw = self.client.get(keys.manifest(stream_id))
            if raw is None:
                return None
            manifest = read_manifest(raw, stream_id)
            check_fingerprint(manifest, expected_fingerprint)
            ids = sorted(manifest.block_ids)
            data = self._fetch(keys.block_prefix(stream_id), ids, _sizes(manifest))
        blocks = {bid: raw for bid, raw in zip(ids, data, strict=True) if raw is not None}
        return decode_state(manifest, blocks, expected_fingerprint, borrow=True)

    def _fetch(self, prefix: str, ids: list[str], sizes: dict[str, int]) -> list[bytes | None]:
        """The blocks' bytes (None where missing), in MGETs of about MGET_BYTES: pipelined on
        one server; one after another on a cluster, whose pipelines refuse MGET (the keys
        share one slot, so each MGET still goes to one node)."""
        batches: list[list[str]] = [[]]
        batch_bytes = 0
        for bid in ids:
            batches[-1].append(prefix + bid)
            batch_bytes += sizes[bid]
            if batch_bytes >= MGET_BYTES:
                batches.append([])
                batch_bytes = 0
        batches = [batch for batch in batches if batch]
        if isinstance(self.client, LazyCluster):
            replies = [self.client.mget(batch) for batch in batches]
        else:
            pipe = self.client.pipeline(transaction=False)
            for batch in batches:
                pipe.mget(batch)
            replies = pipe.execute()
        return [raw for reply in replies for raw in reply]

    def commit(
        self,
        scope: str,
        epoch: int | None,
        states: Sequence[StreamState],
        next_offset: int | None,
        outbox: Sequence[OutboxEntry] = (),
    ) -> SaveReport:
        """Point the streams at their new blocks, record the offset and append the outbox.

        All or nothing, and refused with FencedError unless `epoch` is still the scope's
        current one (None: an unfenced write). Blocks are written first, under new keys.
        """
        started = time.perf_counter()
        keys = self.keys(scope)
        encoded = [encode_state(state) for state in states]
        written_bytes = written_blocks = 0
        with redis_errors():
            for _ in range(COMMIT_ATTEMPTS):
                held, more_bytes, more_blocks = self._prepare(keys, states, encoded)
                written_bytes += more_bytes
                written_blocks += more_blocks
                reply = self._run_commit(epoch, keys, states, encoded, held, next_offset, outbox)
                if reply[0] == b"missing":
                    _check_carried(reply[1:], keys, states, encoded, scope)
                if reply[0] not in (b"missing", b"stale"):
                    break
            _check_reply(reply, scope, epoch)
            if states:
                self.client.hset(
                    index_key(self.prefix), mapping={s.stream_id: scope for s in states}
                )
        manifest_bytes = sum(len(e.manifest) for e in encoded)
        total_blocks = sum(len(e.block_ids) for e in encoded)
        return SaveReport(
            bytes_written=written_bytes + manifest_bytes,
            blocks_written=written_blocks,
            blocks_reused=total_blocks - written_blocks,
            seconds=time.perf_counter() - started,
        )

    def trim_outbox(self, scope: str, epoch: int, delivered: int) -> None:
        """Drop the first `delivered` outbox entries, now produced; fenced like a commit."""
        keys = self.keys(scope)
        with redis_errors():
            reply = self._trim_script(keys=[keys.epoch, keys.outbox], args=[epoch, delivered])
        _check_reply(reply, scope, epoch)

    def _prepare(
        self, keys: ScopeKeys, states: Sequence[StreamState], encoded: Sequence[EncodedState]
    ) -> tuple[list[set[str]], int, int]:
        """Write the blocks Redis lacks; return the block set each stream has now (a commit
        drops those of its blocks it does not name again), and the bytes and blocks written."""
        named = [
            (keys.block_prefix(state.stream_id) + bid, data)
            for state, enc in zip(states, encoded, strict=True)
            for bid, data in enc.blocks.items()
        ]
        pipe = self.client.pipeline(transaction=False)
        for state in states:
            pipe.smembers(keys.block_set(state.stream_id))
        for key, _ in named:
            pipe.exists(key)
        replies = pipe.execute() if states else []
        held = [{bid.decode() for bid in members} for members in replies[: len(states)]]
        absent = [
            item for item, exists in zip(named, replies[len(states) :], strict=True) if not exists
        ]
        pipe = self.client.pipeline(transaction=False)
        for key, data in absent:
            pipe.set(key, data, ex=ORPHAN_BLOCK_SECONDS)
        pipe.execute()
        return held, sum(len(data) for _, data in absent), len(absent)

    def _run_commit(
        self,
        epoch: int | None,
        keys: ScopeKeys,
        states: Sequence[StreamState],
        encoded: Sequence[EncodedState],
        held: Sequence[set[str]],
        next_offset: int | None,
        outbox: Sequence[OutboxEntry],
    ) -> list:
        script_keys = [keys.epoch, keys.offset, keys.outbox, keys.streams]
        args: list[object] = [
            "" if epoch is None else epoch,
            "" if next_offset is None else next_offset,
            self.idle_ttl_seconds or 0,
            len(states),
        ]
        for state, enc, old in zip(states, encoded, held, strict=True):
            ids = sorted(enc.block_ids)
            dropped = sorted(old - enc.block_ids)
            prefix = keys.block_prefix(state.stream_id)
            script_keys += [keys.manifest(state.stream_id), keys.block_set(state.stream_id)]
            script_keys += [prefix + bid for bid in ids + dropped]
            args += [state.stream_id, enc.manifest, len(ids), len(dropped), *ids, *dropped]
        args += [entry.pack() for entry in outbox]
        return self._commit_script(keys=script_keys, args=args)


def _check_carried(
    missing: Sequence[bytes],
    keys: ScopeKeys,
    states: Sequence[StreamState],
    encoded: Sequence[EncodedState],
    scope: str,
) -> None:
    """MissingBlocksError if a missing block is one a state names without carrying it: the
    next attempt writes again only the blocks the states carry."""
    carried = {
        keys.block_prefix(state.stream_id) + bid
        for state, enc in zip(states, encoded, strict=True)
        for bid in enc.blocks
    }
    gone = [key.decode() for key in missing if key.decode() not in carried]
    if gone:
        raise MissingBlocksError(
            f"a commit to {scope!r} names blocks Redis no longer holds "
            f"({', '.join(gone[:3])}); save the streams whole"
        )


def _sizes(manifest: Manifest) -> dict[str, int]:
    return {entry.block: entry.nbytes for entry in manifest.tensors}


def _check_reply(reply: list, scope: str, epoch: int | None) -> None:
    status = reply[0]
    if status == b"fenced":
        current = reply[1].decode() or "none"
        raise FencedError(
            f"partition {scope!r} has a new owner (epoch {current}, this worker holds "
            f"{'none' if epoch is None else epoch}); this worker's write was refused"
        )
    if status == b"stale":
        streams = ", ".join(stream.decode() for stream in reply[1:4])
        raise StateCorruptError(
            f"another writer changed the blocks of {streams} in {scope!r} during each of "
            f"{COMMIT_ATTEMPTS} commits"
        )
    if status != b"ok":
        missing = ", ".join(key.decode() for key in reply[1:4])
        raise StateCorruptError(f"blocks vanished during a commit to {scope!r}: {missing}")
