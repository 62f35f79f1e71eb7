"""Decode across many streams, side by side in one run: sequential, batched, plain transformers.

Every stream starts from the same full cache (its ring turned, so each step evicts a token):
one filled cache is copied through its own export, so the figures need one prefill, not one
per stream. The plain transformers column decodes the same batch with a DynamicCache of the
same length and no sinks: the batched reference without a sink cache. Token ids are random:
speed does not depend on what the tokens say.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from transformers import DynamicCache

from worker.exceptions import CacheCapacityError
from worker.model.batch_cache import batch_forward
from worker.model.compat import cache_argument
from worker.model.decoder import forward_step
from worker.model.loading import LoadedModel
from worker.model.sink_cache import SinkCache
from worker.tools.measure import SINKS, filled_cache, random_ids, timed_ms

Step = Callable[[torch.Tensor], object]  # one decode step, given a token per stream


def run_batch_benchmark(
    loaded: LoadedModel,
    streams: list[int],
    size: int,
    steps: int,
    out: Callable[[str], None] = print,
) -> None:
    if size > loaded.max_cache:
        raise CacheCapacityError(f"{loaded.name} attends to at most {loaded.max_cache} tokens")
    out(
        f"model {loaded.name} on {loaded.device} ({loaded.dtype}), "
        f"{torch.get_num_threads()} CPU threads, full cache of {size}; decode tokens/s in all"
    )
    out(f"{'streams':>7} {'sequential':>11} {'batched':>9} {'speedup':>8} {'transformers':>13}")
    full = filled_cache(loaded, size, size)
    dense = _dense_cache(loaded, size - 1)
    for count in streams:
        caches = [_copy(loaded, full) for _ in range(count)]
        sequential = _rate(loaded, count, steps, _sequential(loaded, caches))
        batched = _rate(loaded, count, steps, partial(batch_forward, loaded.model, caches))
        plain = _rate(loaded, count, steps, _plain(loaded, dense, count))
        out(
            f"{count:>7} {sequential:>11.1f} {batched:>9.1f} {batched / sequential:>7.1f}x "
            f"{plain:>13.1f}"
        )


def _rate(loaded: LoadedModel, count: int, steps: int, step: Step) -> float:
    """Tokens per second over `count` streams, from the median step of `steps`."""
    ids = iter(random_ids(loaded, count * (steps + 1), seed=1).view(steps + 1, count))
    with torch.inference_mode():
        milliseconds = timed_ms(loaded, lambda: step(next(ids)), steps)
    return 1000 * count / milliseconds


def _sequential(loaded: LoadedModel, caches: list[SinkCache]) -> Step:
    """What a worker does today: one forward per stream."""

    def step(ids: torch.Tensor) -> None:
        for cache, token in zip(caches, ids, strict=True):
            forward_step(loaded.model, cache, token[None], last_only=True)

    return step


def _plain(loaded: LoadedModel, dense: DynamicCache, count: int) -> Step:
    """Plain transformers: the batch in one forward over a DynamicCache of `count` rows."""
    cache = copy.deepcopy(dense)
    cache.batch_repeat_interleave(count)

    def step(ids: torch.Tensor) -> None:
        loaded.model(
            input_ids=ids[:, None].to(loaded.device), **cache_argument(loaded.model, cache)
        )

    return step


def _copy(loaded: LoadedModel, cache: SinkCache) -> SinkCache:
    """Another stream in the same state, through the cache's own export."""
    twin = SinkCache.for_model(loaded.model, cache.layout.capacity, SINKS)
    snapshot = cache.snapshot()  # nothing saved yet: it carries every slot
    twin.load(snapshot.tensors, snapshot.meta)
    return twin


@torch.inference_mode()
def _dense_cache(loaded: LoadedModel, length: int) -> DynamicCache:
    cache = DynamicCache(config=loaded.model.config)
    ids = random_ids(loaded, length)[None].to(loaded.device)
    loaded.model(
        input_ids=ids, use_cache=True, logits_to_keep=1, **cache_argument(loaded.model, cache)
    )
    return cache
