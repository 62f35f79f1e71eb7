"""Saved stream states: a versioned, pickle-free format and the stores that keep it.

The package imports nothing of its own until a store is asked for, so a command that needs
only the settings (cache_store.redis.settings) starts without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache_store.store import StateStore


def from_url(url: str, **redis_options: object) -> StateStore:
    """The store a --state URL names: 'dir:PATH', 'memory:' or a Redis URL.

    `redis_options` (prefix, idle_ttl_seconds, password) go to RedisStore.
    """
    scheme, _, rest = url.partition(":")
    if scheme == "dir" and rest:
        from cache_store.local import LocalDirStore

        return LocalDirStore(Path(rest).expanduser())
    if scheme in ("redis", "rediss", "unix"):
        from cache_store.redis.store import RedisStore

        return RedisStore(url, **redis_options)
    if url == "memory:":
        from cache_store.memory import MemoryStore

        return MemoryStore()
    raise ValueError(
        f"unknown state store URL {url!r}; accepted: 'dir:PATH' (states in a local directory), "
        "'memory:' (states kept in memory, lost when the run ends), or a Redis URL "
        "(redis://[:password@]host:port/db, rediss:// for TLS)"
    )
