"""Saved stream states: a versioned, pickle-free format and the stores that keep it."""

from __future__ import annotations

from pathlib import Path

from cache_store.base import MemoryStore, SaveReport, StateStore
from cache_store.codec import FORMAT_VERSION, decode_state, encode_state, read_manifest
from cache_store.exceptions import (
    StateCorruptError,
    StateError,
    StateForeignError,
    StateVersionError,
)
from cache_store.local import LocalDirStore
from cache_store.state import StreamState

__all__ = [
    "FORMAT_VERSION",
    "LocalDirStore",
    "MemoryStore",
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


def from_url(url: str) -> StateStore:
    """The store a --state URL names: 'dir:PATH' (a local directory) or 'memory:' (this run)."""
    scheme, _, rest = url.partition(":")
    if scheme == "dir" and rest:
        return LocalDirStore(Path(rest).expanduser())
    if url == "memory:":
        return MemoryStore()
    raise ValueError(
        f"unknown state store URL {url!r}; accepted: 'dir:PATH' (states in a local directory) "
        "or 'memory:' (states kept in memory, lost when the run ends)"
    )
