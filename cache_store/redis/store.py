"""Stream states in Redis, with the fenced per-partition checkpoint of the distributed worker.

Layout, for key prefix P and a partition (or any other scope) S, all under hash tag {S}:

    P:{S}:epoch            owner token, INCR'd by each new owner of the partition
    P:{S}:offset           next input offset of the partition that the committed states cover
    P:{S}:outbox           list of commentary committed but not yet known to be produced
    P:{S}:streams          set of stream ids with a state in this scope
    P:{S}:m:<stream>       the stream's manifest (codec format)
    P:{S}:bl:<stream>      set of the block ids the manifest names
    P:{S}:b:<stream>:<id>  immutable, content-addressed tensor blocks

plus P:streams, a hash stream id -> scope that admin commands use to find a stream. It is
written after each commit, so it is advisory: the scoped keys are the truth.

Blocks are written before the commit with a short TTL, so the blocks of a commit that never
happens (a crash, a fenced zombie) expire by themselves; the commit makes the blocks it names
permanent (or gives them the stream's idle TTL) and deletes the ones the new manifest dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from cache_store.codec import (
    EncodedState,
    check_fingerprint,
    decode_state,
    encode_state,
    read_manifest,
)
from cache_store.exceptions import StateCorruptError, StateError
from cache_store.redis import scripts as redis_scripts
from cache_store.state import StreamState
from cache_store.store import SaveReport, StateStore

ORPHAN_BLOCK_SECONDS = 3600  # life of a block no commit has named yet
LOCAL_SCOPE = "local"  # scope of states saved outside any partition (local runs, imports)


class FencedError(StateError):
    """Another worker owns the partition now; this worker's writes to it are refused."""


class StoreUnavailableError(StateError):
    """Redis did not answer within the retry budget; nothing was lost, try again later."""


@dataclass(frozen=True)
class OutboxEntry:
    """One committed commentary awaiting delivery; (stream_id, seq) identifies it."""

    stream_id: str
    seq: int
    payload: bytes

    def pack(self) -> bytes:
        return msgpack.packb([self.stream_id, self.seq, self.payload])

    @classmethod
    def unpack(cls, raw: bytes) -> OutboxEntry:
        stream_id, seq, payload = msgpack.unpackb(raw)
        return cls(stream_id, seq, payload)


@dataclass(frozen=True)
class Claim:
    """What a new owner of a partition gets: its epoch and where the last owner stopped."""

    scope: str
    epoch: int
    next_offset: int | None  # None: nothing was ever committed for this partition
    outbox: tuple[OutboxEntry, ...]


@dataclass(frozen=True)
class StreamInfo:
    """What admin commands show about one stored stream."""

    stream_id: str
    scope: str
    epoch: int | None
    partition_next_offset: int | None
    manifest_bytes: int
    block_bytes: int
    ttl_seconds: int | None
    fingerprint: str
    meta: Mapping[str, Any]  # the stream's plain data (counters, layout), no tensors


class _Keys:
    """Key names of one scope; see the module docstring."""

    def __init__(self, prefix: str, scope: str) -> None:
        self.tag = f"{prefix}:{{{scope}}}"
        self.epoch = f"{self.tag}:epoch"
        self.offset = f"{self.tag}:offset"
        self.outbox = f"{self.tag}:outbox"
        self.streams = f"{self.tag}:streams"

    def manifest(self, stream_id: str) -> str:
        return f"{self.tag}:m:{stream_id}"

    def block_set(self, stream_id: str) -> str:
        return f"{self.tag}:bl:{stream_id}"

    def block_prefix(self, stream_id: str) -> str:
        return f"{self.tag}:b:{stream_id}:"


class RedisStore(StateStore):
    """States in Redis; `claim`/`commit`/`trim_outbox` are the distributed worker's protocol.

    The plain StateStore methods (load, save, delete, list_streams) find a stream's scope in
    the index and are unfenced: they serve local runs, admin commands and imports.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "streamsink",
        idle_ttl_seconds: int | None = None,
        password: str | None = None,
        retry_seconds: float = 30.0,
    ) -> None:
        if ":" in prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"key prefix {prefix!r} may not contain ':', '{{' or '}}'")
        self.prefix = prefix
        self.idle_ttl_seconds = idle_ttl_seconds
        retries = max(1, int(retry_seconds / 0.5))
        self.client = redis.Redis.from_url(
            url,
            password=password or None,
            retry=_RetryUnlessRefused(ExponentialBackoff(cap=0.5, base=0.05), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self._commit_script = self.client.register_script(redis_scripts.COMMIT)
        self._trim_script = self.client.register_script(redis_scripts.TRIM_OUTBOX)
        self._delete_script = self.client.register_script(redis_scripts.DELETE_STREAM)
        self._index = f"{prefix}:streams"

    # The partition protocol -----------------------------------------------------------------

    def claim(self, scope: str) -> Claim:
        """Become the owner of `scope`: bump its epoch, read its offset and undelivered outbox."""
        keys = _Keys(self.prefix, scope)
        with _redis_errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.incr(keys.epoch).get(keys.offset).lrange(keys.outbox, 0, -1)
            epoch, offset, outbox = pipe.execute()
        return Claim(
            scope,
            int(epoch),
            None if offset is None else int(offset),
            tuple(OutboxEntry.unpack(raw) for raw in outbox),
        )

    def load_in(
        self, scope: str, stream_id: str, expected_fingerprint: str | None = None
    ) -> StreamState | None:
        """The stream's state in `scope`, or None; raises StateError on a bad state."""
        keys = _Keys(self.prefix, scope)
        with _redis_errors():
            raw = self.client.get(keys.manifest(stream_id))
            if raw is None:
                return None
            manifest = read_manifest(raw, stream_id)
            check_fingerprint(manifest, expected_fingerprint)
            ids = sorted(manifest.block_ids)
            prefix = keys.block_prefix(stream_id)
            data = self.client.mget([prefix + bid for bid in ids]) if ids else []
        blocks = {bid: raw for bid, raw in zip(ids, data, strict=True) if raw is not None}
        return decode_state(manifest, blocks, expected_fingerprint)

    def commit(
        self,
        claim: Claim | None,
        scope: str,
        states: Sequence[StreamState],
        next_offset: int | None,
        outbox: Sequence[OutboxEntry] = (),
    ) -> SaveReport:
        """Point the streams at their new blocks, record the offset and append the outbox.

        All or nothing, and refused with FencedError unless `claim` is still the scope's
        current epoch (None: an unfenced save). Blocks are written first, under new keys.
        """
        started = time.perf_counter()
        keys = _Keys(self.prefix, scope)
        encoded = [encode_state(state) for state in states]
        with _redis_errors():
            written = self._write_missing_blocks(keys, states, encoded)
            reply = self._run_commit(claim, keys, states, encoded, next_offset, outbox)
            if reply[0] == b"missing":  # an unnamed block expired between check and commit
                written += self._write_missing_blocks(keys, states, encoded, force=True)
                reply = self._run_commit(claim, keys, states, encoded, next_offset, outbox)
            self._check_reply(reply, scope, claim)
            if states:
                self.client.hset(self._index, mapping={s.stream_id: scope for s in states})
        manifest_bytes = sum(len(e.manifest) for e in encoded)
        total_blocks = sum(len(e.blocks) for e in encoded)
        return SaveReport(
            bytes_written=written[0] + manifest_bytes,
            blocks_written=written[1],
            blocks_reused=total_blocks - written[1],
            seconds=time.perf_counter() - started,
        )

    def trim_outbox(self, claim: Claim, delivered: int) -> None:
        """Drop the first `delivered` outbox entries, now produced; fenced like a commit."""
        keys = _Keys(self.prefix, claim.scope)
        with _redis_errors():
            reply = self._trim_script(keys=[keys.epoch, keys.outbox], args=[claim.epoch, delivered])
        self._check_reply(reply, claim.scope, claim)

    # The StateStore interface -----------------------------------------------------------------

    def load(self, stream_id: str, expected_fingerprint: str | None = None) -> StreamState | None:
        scope = self.scope_of(stream_id)
        return None if scope is None else self.load_in(scope, stream_id, expected_fingerprint)

    def save(self, state: StreamState) -> SaveReport:
        scope = self.scope_of(state.stream_id) or LOCAL_SCOPE
        return self.commit(None, scope, [state], next_offset=None)

    def delete(self, stream_id: str) -> bool:
        scope = self.scope_of(stream_id)
        if scope is None:
            return False
        keys = _Keys(self.prefix, scope)
        with _redis_errors():
            existed = self._delete_script(
                keys=[keys.manifest(stream_id), keys.block_set(stream_id), keys.streams],
                args=[stream_id, keys.block_prefix(stream_id)],
            )
            self.client.hdel(self._index, stream_id)
        return bool(existed)

    def list_streams(self) -> list[str]:
        with _redis_errors():
            return sorted(raw.decode() for raw in self.client.hkeys(self._index))

    def close(self) -> None:
        self.client.close()

    # Admin ---------------------------------------------------------------------------------

    def scope_of(self, stream_id: str) -> str | None:
        with _redis_errors():
            scope = self.client.hget(self._index, stream_id)
        return None if scope is None else scope.decode()

    def info(self, stream_id: str) -> StreamInfo | None:
        """Sizes, owner epoch, TTL and meta of a stored stream, without fetching its tensors."""
        scope = self.scope_of(stream_id)
        if scope is None:
            return None
        keys = _Keys(self.prefix, scope)
        with _redis_errors():
            pipe = self.client.pipeline(transaction=False)
            pipe.get(keys.manifest(stream_id)).smembers(keys.block_set(stream_id))
            pipe.get(keys.epoch).get(keys.offset).ttl(keys.manifest(stream_id))
            raw, block_ids, epoch, offset, ttl = pipe.execute()
            prefix = keys.block_prefix(stream_id)
            pipe = self.client.pipeline(transaction=False)
            for bid in block_ids:
                pipe.strlen(prefix + bid.decode())
            block_bytes = sum(pipe.execute()) if block_ids else 0
        if raw is None:
            return None
        manifest = read_manifest(raw, stream_id)
        return StreamInfo(
            stream_id,
            scope,
            None if epoch is None else int(epoch),
            None if offset is None else int(offset),
            len(raw),
            block_bytes,
            ttl if ttl >= 0 else None,
            manifest.fingerprint,
            manifest.meta,
        )

    def ping(self) -> None:
        with _redis_errors():
            self.client.ping()

    # Internals --------------------------------------------------------------------------------

    def _write_missing_blocks(
        self,
        keys: _Keys,
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
        claim: Claim | None,
        keys: _Keys,
        states: Sequence[StreamState],
        encoded: Sequence[EncodedState],
        next_offset: int | None,
        outbox: Sequence[OutboxEntry],
    ) -> list:
        script_keys = [keys.epoch, keys.offset, keys.outbox, keys.streams]
        args: list[object] = [
            "" if claim is None else claim.epoch,
            "" if next_offset is None else next_offset,
            self.idle_ttl_seconds or 0,
            len(states),
        ]
        for state, enc in zip(states, encoded, strict=True):
            ids = sorted(enc.blocks)
            prefix = keys.block_prefix(state.stream_id)
            script_keys += [keys.manifest(state.stream_id), keys.block_set(state.stream_id)]
            script_keys += [prefix + bid for bid in ids]
            args += [state.stream_id, prefix, enc.manifest, len(ids), *ids]
        args += [entry.pack() for entry in outbox]
        return self._commit_script(keys=script_keys, args=args)

    @staticmethod
    def _check_reply(reply: list, scope: str, claim: Claim | None) -> None:
        status = reply[0]
        if status == b"fenced":
            current = reply[1].decode() or "none"
            raise FencedError(
                f"partition {scope!r} has a new owner (epoch {current}, this worker holds "
                f"{claim.epoch if claim else 'none'}); this worker's write was refused"
            )
        if status != b"ok":
            missing = ", ".join(key.decode() for key in reply[1:4])
            raise StateCorruptError(f"blocks vanished during a commit to {scope!r}: {missing}")


class _RetryUnlessRefused(Retry):
    """Retries lost connections, not a refused password: waiting would not fix that."""

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, redis.AuthenticationError):
                return False
            return is_retryable is None or is_retryable(error)

        return super().call_with_retry(do, fail, retryable, with_failure_count)


@contextmanager
def _redis_errors() -> Iterator[None]:
    """Turn connection loss (after redis-py's own retries) into StoreUnavailableError."""
    try:
        yield
    except redis.AuthenticationError as error:
        raise StoreUnavailableError(f"Redis refused the credentials: {error}") from error
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise StoreUnavailableError(f"Redis is unavailable: {error}") from error
