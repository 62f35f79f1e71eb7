"""Side-by-side figures in one run: sink against recompute per token, and memory over a stream.

Token ids are random: speed does not depend on what the tokens say.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.model.batch_invariance import is_batch_invariant
from worker.model.decoder import decode_step
from worker.model.graph_step import graph_steps
from worker.model.loading import LoadedModel
from worker.tools.measure import filled_cache, peak_memory_mb, random_ids, timed_ms


def run_benchmark(
    loaded: LoadedModel,
    sizes: list[int],
    decode_tokens: int,
    stream_lengths: list[int],
    out: Callable[[str], None] = print,
) -> None:
    out(
        f"model {loaded.name} on {loaded.device} ({loaded.dtype}), "
        f"{torch.get_num_threads()} CPU threads"
    )
    out(f"{'cache':>6} {'sink ms/token':>14} {'recompute ms/token':>19} {'speedup':>8}")
    for size in sizes:
        if size > loaded.max_cache:
            out(f"{size:>6} skipped: the model attends to at most {loaded.max_cache} tokens")
            continue
        sink_ms = _sink_decode_ms(loaded, size, decode_tokens)
        recompute_ms = _recompute_ms(loaded, size, max(2, decode_tokens // 8))
        out(f"{size:>6} {sink_ms:>14.2f} {recompute_ms:>19.2f} {recompute_ms / sink_ms:>7.1f}x")
    out(f"{'stream tokens':>13} {'sink cache MB':>14} {'dense cache MB':>15} {'peak MB':>9}")
    for length in stream_lengths:
        cache_mb, dense_mb, peak_mb = _stream_memory(loaded, length, min(1024, loaded.max_cache))
        out(f"{length:>13} {cache_mb:>14.2f} {dense_mb:>15.2f} {peak_mb:>9.1f}")


@torch.inference_mode()
def _sink_decode_ms(loaded: LoadedModel, size: int, tokens: int) -> float:
    """One decode step in a full cache of `size` (every step evicts one token), the step a
    worker's decoder runs for a lone stream: on a GPU replayed from a CUDA graph (of one row:
    the cache has a pool of its own), on the CPU the batched step of one row."""
    cache = filled_cache(loaded, size, size)
    next_ids = iter(random_ids(loaded, tokens + 1, seed=1).split(1))
    graphs = graph_steps(loaded.model, cache.pool)
    batched = is_batch_invariant(loaded.model)

    def step() -> None:
        decode_step(loaded.model, [cache], next(next_ids), batched, True, graphs)

    return timed_ms(loaded, step, tokens)


@torch.inference_mode()
def _recompute_ms(loaded: LoadedModel, size: int, repeats: int) -> float:
    """One token by re-computing the last `size` tokens from scratch."""
    window = random_ids(loaded, size)[None].to(loaded.device)
    return timed_ms(loaded, lambda: loaded.model(input_ids=window, logits_to_keep=1), repeats)


def _stream_memory(loaded: LoadedModel, length: int, capacity: int) -> tuple[float, float, float]:
    cache = filled_cache(loaded, capacity, length, seed=2)
    layer = cache.layers[0]
    per_token = 2 * layer.keys[:, :, :1].numel() * layer.keys.element_size() * len(cache.layers)
    cache_mb = per_token * capacity / 2**20
    dense_mb = per_token * length / 2**20
    return cache_mb, dense_mb, peak_memory_mb(loaded)
