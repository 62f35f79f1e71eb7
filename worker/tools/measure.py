"""Timing and memory figures the benchmarks and the evaluation share."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch

from worker.model.decoder import forward_step
from worker.model.loading import LoadedModel
from worker.model.sink_cache import SinkCache

SINKS = 4
PREFILL_CHUNK = 256


def random_ids(loaded: LoadedModel, count: int, seed: int = 0) -> torch.Tensor:
    """Token ids drawn from the model's vocabulary: speed does not depend on what they say."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, loaded.model.config.vocab_size, (count,), generator=generator)


@torch.inference_mode()
def filled_cache(loaded: LoadedModel, capacity: int, tokens: int, seed: int = 0) -> SinkCache:
    """A sink cache of `capacity` that has taken `tokens` random tokens, in chunks."""
    cache = SinkCache.for_model(loaded.model, capacity, SINKS)
    for piece in random_ids(loaded, tokens, seed).split(PREFILL_CHUNK):
        forward_step(loaded.model, cache, piece, last_only=True)
    return cache


def synchronize(loaded: LoadedModel) -> None:
    """Wait for the model's device, so that a clock read after it counts the work queued."""
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def timed_ms(loaded: LoadedModel, step: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `step`, after one warm-up call."""
    step()
    samples = []
    for _ in range(repeats):
        synchronize(loaded)
        started = time.perf_counter()
        step()
        synchronize(loaded)
        samples.append(1000 * (time.perf_counter() - started))
    return statistics.median(samples)


def peak_memory_mb(loaded: LoadedModel) -> float:
    """Peak memory so far: allocated on the GPU, or the process's resident set on the CPU."""
    if loaded.device.type == "cuda":
        return torch.cuda.max_memory_allocated(loaded.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
