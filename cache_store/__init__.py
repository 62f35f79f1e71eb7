"""Saved stream states: a versioned, pickle-free format and the stores that keep it."""

from __future__ import annotations

from pathlib import Path

from cache_store.codec import FORMAT_VERSION, decode_state, encode_state, read_manifest
from cache_store.exceptions import (
    StateCorruptError,
    StateError,
    StateForeignError,
    StateVersionError,
)
from cache_store.local import LocalDirStore
from cache_store.memory import MemoryStore
from cache_store.memory_partition import MemoryPartitionStore
from cache_store.partition import PartitionLease, PartitionStore
from cache_store.redis.store import RedisStore
from cache_store.state import Expected, StreamState
from cache_store.store import SaveReport, StateStore

__all__ = [
    "FORMAT_VERSION",
    "Expected",
    "LocalDirStore",
    "MemoryPartitionStore",
    "MemoryStore",
    "PartitionLease",
    "PartitionStore",
    "RedisStore",
    "SaveReport",
    "StateCorruptError",
    "StateError",
    "StateForeignError",
    "StateStore",
    "StateVersionError",
    "StreamState",
    "decode_state",
    "encode_state",
    "from_url",
    "read_manifest",
]


def from_url(url: str, **redis_options: object) -> StateStore:
    """The store a --state URL names: 'dir:PATH', 'memory:' or a Redis URL.

    `redis_options` (prefix, idle_ttl_seconds, password) go to RedisStore.
    """
    scheme, _, rest = url.partition(":")
    if scheme == "dir" and rest:
        return LocalDirStore(Path(rest).expanduser())
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, **redis_options)
    if url == "memory:":
        return MemoryStore()
    raise ValueError(
        f"unknown state store URL {url!r}; accepted: 'dir:PATH' (states in a local directory), "
        "'memory:' (states kept in memory, lost when the run ends), or a Redis URL "
        "(redis://[:password@]host:port/db, rediss:// for TLS)"
    )
