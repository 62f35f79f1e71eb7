"""Stream states in Redis: the StateStore of local runs and admin commands, and the
PartitionStore of the distributed worker (`claim` gives a fenced RedisLease).

The plain StateStore methods (load, save, delete, list_streams) find a stream's scope in the
index and are unfenced; so is `commit_unfenced`, which imports use to put a state back into
the partition it came from.

With `cluster=True` the URL names one node of a Redis Cluster. Nothing else changes: every
key of a scope carries its hash tag, so each script runs on the node that holds the scope.
"""

from __future__ import annotations

from collections.abc import Sequence

from cache_store.exceptions import StateCorruptError
from cache_store.partition import OutboxEntry
from cache_store.redis import admin, scripts
from cache_store.redis.admin import StreamInfo
from cache_store.redis.client import connect, redis_errors
from cache_store.redis.keys import check_prefix, index_key
from cache_store.redis.lease import RedisLease
from cache_store.redis.scoped import COMMIT_ATTEMPTS, ScopedStates
from cache_store.state import Expected, StreamState
from cache_store.store import SaveReport, StateStore

LOCAL_SCOPE = "local"  # scope of states saved outside any partition (local runs, imports)


class RedisStore(StateStore):
    """States in Redis under one key prefix; see the module docstring."""

    def __init__(
        self,
        url: str,
        prefix: str = "streamsink",
        idle_ttl_seconds: int | None = None,
        password: str | None = None,
        retry_seconds: float = 30.0,
        cluster: bool = False,
    ) -> None:
        check_prefix(prefix)
        self.prefix = prefix
        self.client = connect(url, password, retry_seconds, cluster)
        self.states = ScopedStates(self.client, prefix, idle_ttl_seconds)
        self._claim_script = self.client.register_script(scripts.CLAIM)
        self._delete_script = self.client.register_script(scripts.DELETE_STREAM)

    # The partition protocol -----------------------------------------------------------------

    def claim(self, scope: str) -> RedisLease:
        """Become the owner of `scope`: bump its epoch, read its offset and undelivered outbox."""
        keys = self.states.keys(scope)
        with redis_errors():  # a script, not MULTI: the same on a server and on a cluster
            epoch, offset, outbox = self._claim_script(keys=[keys.epoch, keys.offset, keys.outbox])
        return RedisLease(
            self.states,
            scope,
            int(epoch),
            None if offset is None else int(offset),
            tuple(OutboxEntry.unpack(raw) for raw in outbox),
        )

    def commit_unfenced(
        self, scope: str, states: Sequence[StreamState], next_offset: int | None = None
    ) -> SaveReport:
        """Write states into `scope` whoever owns it: for imports and saves, never a worker."""
        return self.states.commit(scope, None, states, next_offset)

    # The StateStore interface -----------------------------------------------------------------

    def load(
        self, stream_id: str, expected_fingerprint: str | Expected | None = None
    ) -> StreamState | None:
        scope = self.scope_of(stream_id)
        if scope is None:
            return None
        return self.states.load(scope, stream_id, expected_fingerprint)

    def save(self, state: StreamState) -> SaveReport:
        return self.commit_unfenced(self.scope_of(state.stream_id) or LOCAL_SCOPE, [state])

    def delete(self, stream_id: str) -> bool:
        scope = self.scope_of(stream_id)
        if scope is None:
            return False
        keys = self.states.keys(scope)
        stream_keys = [keys.manifest(stream_id), keys.block_set(stream_id), keys.streams]
        with redis_errors():
            for _ in range(COMMIT_ATTEMPTS):
                ids = sorted(bid.decode() for bid in self.client.smembers(stream_keys[1]))
                block_keys = [keys.block_prefix(stream_id) + bid for bid in ids]
                existed = self._delete_script(keys=stream_keys + block_keys, args=[stream_id, *ids])
                if existed >= 0:  # -1: a commit changed the block set since it was read
                    break
            else:
                raise StateCorruptError(
                    f"the blocks of {stream_id!r} changed during each of {COMMIT_ATTEMPTS} "
                    "deletes: is a worker still writing it?"
                )
            self.client.hdel(index_key(self.prefix), stream_id)
        return existed == 1

    def list_streams(self) -> list[str]:
        with redis_errors():
            return sorted(raw.decode() for raw in self.client.hkeys(index_key(self.prefix)))

    def close(self) -> None:
        self.client.close()

    # Admin ---------------------------------------------------------------------------------

    def scope_of(self, stream_id: str) -> str | None:
        return admin.scope_of(self.client, self.prefix, stream_id)

    def info(self, stream_id: str) -> StreamInfo | None:
        """Sizes, owner epoch, TTL and meta of a stored stream, without fetching its tensors."""
        scope = self.scope_of(stream_id)
        if scope is None:
            return None
        return admin.stream_info(self.client, self.states.keys(scope), stream_id)

    def ping(self) -> None:
        with redis_errors():
            self.client.ping()
