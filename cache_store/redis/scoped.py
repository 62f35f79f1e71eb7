"""Reading and committing the states of one scope, fenced on an owner's epoch or not.

Blocks are written before the commit with a short TTL, so the blocks of a commit that never
happens (a crash, a fenced zombie) expire by themselves; the commit makes the blocks it names
permanent (or gives them the stream's idle TTL) and deletes the ones the new manifest dropped.
A state that names blocks without carrying them (`StreamState.stored`) has them checked by the
commit like the others. A load fetches the blocks in pipelined MGETs of about MGET_BYTES.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

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
from cache_store.redis.client import redis_errors
from cache_store.redis.keys import ScopeKeys, index_key
from cache_store.state import StreamState
from cache_store.store import SaveReport

ORPHAN_BLOCK_SECONDS = 3600  # life of a block no commit has named yet
MGET_BYTES = 8 * 2**20  # block bytes asked for in one MGET of a load


class ScopedStates:
    """The states of every scope under one key prefix; see the module docstring."""

    def __init__(self, client: redis.Redis, prefix: str, idle_ttl_seconds: int | None) -> None:
        self.client, self.prefix, self.idle_ttl_seconds = client, prefix, idle_ttl_seconds
        self._commit_script = client.register_script(scripts.COMMIT)
        self._trim_script = client.register_script(scripts.TRIM_OUTBOX)

    def keys(self, scope: str) -> ScopeKeys:
        return ScopeKeys(self.prefix, scope)

    def load(
        self, scope: str, stream_id: str, expected_fingerprint: str | None = None
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
        """The blocks' bytes (None where missing), in MGETs of about MGET_BYTES, pipelined."""
        pipe = self.client.pipeline(transaction=False)
        batch: list[str] = []
        batch_bytes = 0
        for bid in ids:
            batch.append(prefix + bid)
            batch_bytes += sizes[bid]
            if batch_bytes >= MGET_BYTES:
                pipe.mget(batch)
                batch, batch_bytes = [], 0
        if batch:
            pipe.mget(batch)
        return [raw for reply in pipe.execute() for raw in reply]

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
        with redis_errors():
            written = self._write_missing_blocks(keys, states, encoded)
            reply = self._run_commit(epoch, keys, states, encoded, next_offset, outbox)
            if reply[0] == b"missing":  # an unnamed block expired between check and commit
                written += self._write_missing_blocks(keys, states, encoded, force=True)
                reply = self._run_commit(epoch, keys, states, encoded, next_offset, outbox)
            if reply[0] == b"missing":  # a block named without its bytes is gone
                raise MissingBlocksError(
                    f"a commit to {scope!r} names blocks Redis no longer holds "
                    f"({', '.join(key.decode() for key in reply[1:4])}); save the streams whole"
                )
            _check_reply(reply, scope, epoch)
            if states:
                self.client.hset(
                    index_key(self.prefix), mapping={s.stream_id: scope for s in states}
                )
        manifest_bytes = sum(len(e.manifest) for e in encoded)
        total_blocks = sum(len(e.block_ids) for e in encoded)
        return SaveReport(
            bytes_written=written[0] + manifest_bytes,
            blocks_written=written[1],
            blocks_reused=total_blocks - written[1],
            seconds=time.perf_counter() - started,
        )

    def trim_outbox(self, scope: str, epoch: int, delivered: int) -> None:
        """Drop the first `delivered` outbox entries, now produced; fenced like a commit."""
        keys = self.keys(scope)
        with redis_errors():
            reply = self._trim_script(keys=[keys.epoch, keys.outbox], args=[epoch, delivered])
        _check_reply(reply, scope, epoch)

    def _write_missing_blocks(
        self,
        keys: ScopeKeys,
        states: Sequence[StreamState],
        encoded: Sequence[EncodedState],
        force: bool = False,
    ) -> tuple[int, int]:
        """Write the blocks Redis lacks (all of them with `force`); returns (bytes, blocks)."""
        named = [
            (keys.block_prefix(state.stream_id) + bid, data)
            for state, enc in zip(states, encoded, strict=True)
            for bid, data in enc.blocks.items()
        ]
        if not force and named:
            pipe = self.client.pipeline(transaction=False)
            for key, _ in named:
                pipe.exists(key)
            named = [item for item, exists in zip(named, pipe.execute(), strict=True) if not exists]
        pipe = self.client.pipeline(transaction=False)
        for key, data in named:
            pipe.set(key, data, ex=ORPHAN_BLOCK_SECONDS)
        pipe.execute()
        return sum(len(data) for _, data in named), len(named)

    def _run_commit(
        self,
        epoch: int | None,
        keys: ScopeKeys,
        states: Sequence[StreamState],
        encoded: Sequence[EncodedState],
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
        for state, enc in zip(states, encoded, strict=True):
            ids = sorted(enc.block_ids)
            prefix = keys.block_prefix(state.stream_id)
            script_keys += [keys.manifest(state.stream_id), keys.block_set(state.stream_id)]
            script_keys += [prefix + bid for bid in ids]
            args += [state.stream_id, prefix, enc.manifest, len(ids), *ids]
        args += [entry.pack() for entry in outbox]
        return self._commit_script(keys=script_keys, args=args)


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
    if status != b"ok":
        missing = ", ".join(key.decode() for key in reply[1:4])
        raise StateCorruptError(f"blocks vanished during a commit to {scope!r}: {missing}")
