"""Restoring a stream from the state store against recomputing its window, side by side.

For each cache size C: fill a session's cache, checkpoint it (a first, full save, then the
next one after NEXT_TOKENS more tokens, which carries only what those tokens changed), then
time loading it back into a ready session against prefilling C tokens into an empty cache,
which is what a worker without saved state pays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cache_store.partition import PartitionLease
from cache_store.redis.store import RedisStore
from cache_store.store import SaveReport
from worker.model.cache_settings import CacheSettings
from worker.model.loading import LoadedModel
from worker.stream.commentator import Commentator
from worker.stream.session import StreamSession
from worker.stream.session_state import expected_writer, mark_saved, restore, snapshot
from worker.tools.measure import random_ids, timed_ms

SCOPE = "bench/0"
NEXT_TOKENS = 16  # tokens between the first and the next checkpoint


@dataclass(frozen=True)
class RestoreFigures:
    """One cache size's figures; the next checkpoint's bytes are block bytes plus manifest."""

    cache: int
    state_mb: float
    first_checkpoint_ms: float
    next_checkpoint_kb: float
    next_manifest_kb: float
    changed_kv_kb: float  # the KV of the NEXT_TOKENS slots that changed
    next_checkpoint_ms: float
    restore_ms: float
    prefill_ms: float

    @property
    def ratio(self) -> float:
        return self.prefill_ms / self.restore_ms

    def to_json_dict(self) -> dict[str, float]:
        return {**self.__dict__, "prefill_over_restore": round(self.ratio, 1)}


def run_restore_benchmark(
    loaded: LoadedModel,
    store: RedisStore,
    sizes: list[int],
    repeats: int = 3,
    out: Callable[[str], None] = print,
) -> list[RestoreFigures]:
    """Figures for each size that fits the model, with a table line for each through `out`."""
    out(f"model {loaded.name} on {loaded.device} ({loaded.dtype}), state in Redis")
    out(
        f"{'cache':>6} {'state MB':>9} {'first ms':>9} {'next KB':>8} {'of which manifest':>18} "
        f"{'changed KV KB':>14} {'next ms':>8} {'restore ms':>11} {'prefill ms':>11} {'ratio':>7}"
    )
    lease = store.claim(SCOPE)
    figures = []
    for size in sizes:
        if size > loaded.max_cache:
            out(f"{size:>6} skipped: the model attends to at most {loaded.max_cache} tokens")
            continue
        row = _measure(loaded, store, lease, size, repeats)
        figures.append(row)
        out(
            f"{row.cache:>6} {row.state_mb:>9.2f} {row.first_checkpoint_ms:>9.1f} "
            f"{row.next_checkpoint_kb:>8.1f} {row.next_manifest_kb:>18.1f} "
            f"{row.changed_kv_kb:>14.1f} {row.next_checkpoint_ms:>8.1f} {row.restore_ms:>11.1f} "
            f"{row.prefill_ms:>11.1f} {row.ratio:>6.1f}x"
        )
    return figures


def _measure(
    loaded: LoadedModel, store: RedisStore, lease: PartitionLease, size: int, repeats: int
) -> RestoreFigures:
    """The figures of a cache of `size` tokens."""
    commentator = Commentator(loaded, CacheSettings(sinks=4, window=size - 4))
    stream_id = f"bench-{size}"
    ids = random_ids(loaded, size + NEXT_TOKENS)
    session = commentator.new_empty_session(stream_id)
    commentator.feed(session, ids[:size])
    _, first_ms = _checkpoint(commentator, session, lease, size)
    commentator.feed(session, ids[size:])
    following, following_ms = _checkpoint(commentator, session, lease, size + NEXT_TOKENS)
    info = store.info(stream_id)
    layer = session.cache.layers[0]
    slot_bytes = 2 * len(session.cache.layers) * layer.keys[:, :, 0].numel() * layer.keys.itemsize

    def restore_once() -> None:
        restore(lease.load(stream_id, expected_writer(commentator)), commentator)

    def prefill_once() -> None:
        commentator.feed(commentator.new_empty_session(stream_id), ids[NEXT_TOKENS:])

    restore_ms = timed_ms(loaded, restore_once, repeats)
    prefill_ms = timed_ms(loaded, prefill_once, repeats)
    store.delete(stream_id)
    return RestoreFigures(
        cache=size,
        state_mb=round((info.manifest_bytes + info.block_bytes) / 2**20, 2),
        first_checkpoint_ms=round(first_ms, 1),
        next_checkpoint_kb=round(following.bytes_written / 1024, 1),
        next_manifest_kb=round(info.manifest_bytes / 1024, 1),
        changed_kv_kb=round(NEXT_TOKENS * slot_bytes / 1024, 1),
        next_checkpoint_ms=round(following_ms, 1),
        restore_ms=round(restore_ms, 1),
        prefill_ms=round(prefill_ms, 1),
    )


def _checkpoint(
    commentator: Commentator, session: StreamSession, lease: PartitionLease, offset: int
) -> tuple[SaveReport, float]:
    """A checkpoint as the worker makes it (snapshot, commit, saved); its report and ms."""
    started = time.perf_counter()
    report = lease.commit([snapshot(session, commentator)], next_offset=offset)
    mark_saved(session)
    return report, 1000 * (time.perf_counter() - started)
