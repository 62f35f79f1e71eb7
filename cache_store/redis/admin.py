"""What admin commands ask of Redis: where a stream lives and what its state costs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cache_store.codec import read_manifest
from cache_store.redis.client import Client, redis_errors
from cache_store.redis.keys import ScopeKeys, index_key


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


def scope_of(client: Client, prefix: str, stream_id: str) -> str | None:
    """The scope the index names for the stream (advisory: written after each commit)."""
    with redis_errors():
        scope = client.hget(index_key(prefix), stream_id)
    return None if scope is None else scope.decode()


def stream_info(client: Client, keys: ScopeKeys, stream_id: str) -> StreamInfo | None:
    """Sizes, owner epoch, TTL and meta of a stored stream, without fetching its tensors."""
    with redis_errors():
        pipe = client.pipeline(transaction=False)
        pipe.get(keys.manifest(stream_id)).smembers(keys.block_set(stream_id))
        pipe.get(keys.epoch).get(keys.offset).ttl(keys.manifest(stream_id))
        raw, block_ids, epoch, offset, ttl = pipe.execute()
        prefix = keys.block_prefix(stream_id)
        pipe = client.pipeline(transaction=False)
        for bid in block_ids:
            pipe.strlen(prefix + bid.decode())
        block_bytes = sum(pipe.execute()) if block_ids else 0
    if raw is None:
        return None
    manifest = read_manifest(raw, stream_id)
    return StreamInfo(
        stream_id,
        keys.scope,
        None if epoch is None else int(epoch),
        None if offset is None else int(offset),
        len(raw),
        block_bytes,
        ttl if ttl >= 0 else None,
        manifest.fingerprint,
        manifest.meta,
    )
