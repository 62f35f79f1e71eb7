"""Restoring a stream from the state store against recomputing its window, side by side.

For each cache size C: fill a session's cache, checkpoint it (a first, full save and a next
one after a few more tokens), then time loading it back into a ready session against
prefilling C tokens into an empty cache, which is what a worker without saved state pays.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cache_store.partition import PartitionLease
from cache_store.redis.store import RedisStore
from cache_store.store import SaveReport
from worker.model.cache_settings import CacheSettings
from worker.model.loading import LoadedModel
from worker.stream.commentator import Commentator
from worker.stream.session import StreamSession
from worker.stream.session_state import restore, snapshot
from worker.tools.measure import random_ids, timed_ms

SCOPE = "bench/0"
NEXT_TOKENS = 16  # tokens between the first and the next checkpoint


def run_restore_benchmark(
    loaded: LoadedModel,
    store: RedisStore,
    sizes: list[int],
    repeats: int = 3,
    out: Callable[[str], None] = print,
) -> None:
    out(f"model {loaded.name} on {loaded.device} ({loaded.dtype}), state in Redis")
    out(
        f"{'cache':>6} {'state MB':>9} {'first save ms':>14} {'next save KB':>13} "
        f"{'next save ms':>13} {'restore ms':>11} {'prefill ms':>11} {'ratio':>7}"
    )
    lease = store.claim(SCOPE)
    for size in sizes:
        if size > loaded.max_cache:
            out(f"{size:>6} skipped: the model attends to at most {loaded.max_cache} tokens")
            continue
        out(_measure(loaded, store, lease, size, repeats))


def _measure(
    loaded: LoadedModel, store: RedisStore, lease: PartitionLease, size: int, repeats: int
) -> str:
    """One row of the table for a cache of `size` tokens."""
    commentator = Commentator(loaded, CacheSettings(sinks=4, window=size - 4))
    stream_id = f"bench-{size}"
    ids = random_ids(loaded, size + NEXT_TOKENS)
    session = commentator.new_empty_session(stream_id)
    commentator.feed(session, ids[:size])
    first, first_ms = _checkpoint(commentator, session, lease, size)
    commentator.feed(session, ids[size:])
    following, following_ms = _checkpoint(commentator, session, lease, size + NEXT_TOKENS)
    info = store.info(stream_id)

    def restore_once() -> None:
        restore(lease.load(stream_id, loaded.fingerprint), commentator)

    def prefill_once() -> None:
        commentator.feed(commentator.new_empty_session(stream_id), ids[NEXT_TOKENS:])

    restore_ms = timed_ms(loaded, restore_once, repeats)
    prefill_ms = timed_ms(loaded, prefill_once, repeats)
    store.delete(stream_id)
    return (
        f"{size:>6} {(info.manifest_bytes + info.block_bytes) / 2**20:>9.2f} "
        f"{first_ms:>14.1f} {following.bytes_written / 1024:>13.1f} "
        f"{following_ms:>13.1f} {restore_ms:>11.1f} {prefill_ms:>11.1f} "
        f"{prefill_ms / restore_ms:>6.1f}x"
    )


def _checkpoint(
    commentator: Commentator, session: StreamSession, lease: PartitionLease, offset: int
) -> tuple[SaveReport, float]:
    """A checkpoint as the worker makes it (snapshot, then commit); its report and ms."""
    started = time.perf_counter()
    report = lease.commit([snapshot(session, commentator)], next_offset=offset)
    return report, 1000 * (time.perf_counter() - started)
