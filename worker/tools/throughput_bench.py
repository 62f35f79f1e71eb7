"""Decode and prefill across many streams, side by side in one run: the batched sink path (one
forward across streams), the sequential sink path (one forward per stream), and plain
transformers batched with a DynamicCache of the same length and no sinks, on its own kernels
(the reference a sink cache is measured against), for each dtype asked for; and llama.cpp on
the same weights in F32 beside the float32 figures, where it is installed (llama_cpp_bench.py).

Every stream starts from the same full cache (its ring turned, so each step evicts a token):
one filled cache is copied through its own export into a slot of one pool for each of the most
streams asked for, and the figure of N streams decodes the first N, so the figures need one
prefill, not one per stream. That prefill (chunks of PREFILL_CHUNK, one stream, as a worker
prefills), the median of PREFILL_RUNS, is the prefill figure; the dense cache's is
transformers'; llama.cpp's is the median of its first sequence's, one per number of streams.
Token ids are random: speed does not depend on what the tokens say. The machine's other work
moves absolute figures (a prefill by a third from one run to the next); the ratios within one
run are what hold. On a GPU every figure decodes through one captured step (graph_step.py).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache

from worker.exceptions import CacheCapacityError
from worker.model.batch_invariance import is_batch_invariant, stock_kernels
from worker.model.compat import cache_argument
from worker.model.decoder import decode_step
from worker.model.graph_step import GraphSteps, graph_steps
from worker.model.kv_pool import KVPool, decoder_pool
from worker.model.loading import LoadedModel
from worker.model.sink_cache import SinkCache
from worker.tools.llama_cpp_bench import LlamaCpp
from worker.tools.measure import (
    PREFILL_CHUNK,
    SINKS,
    filled_cache,
    peak_memory_mb,
    random_ids,
    timed_ms,
)

Step = Callable[[torch.Tensor], object]  # one decode step, given a token per stream
PREFILL_RUNS = 3
PATHS = ("batched", "sequential", "transformers")


@dataclass(frozen=True)
class Prefill:
    """Prefill tokens/s of one stream, chunks of PREFILL_CHUNK, up to the cache size."""

    dtype: str
    sink: float
    transformers: float
    llama_cpp: float | None = None


@dataclass(frozen=True)
class Decode:
    """Decode tokens/s in all over `streams` streams, per path, and the memory it took."""

    dtype: str
    streams: int
    batched: float
    sequential: float
    transformers: float
    llama_cpp: float | None  # F32 weights, beside float32 only, where it is installed
    sink_cache_mb: float  # every stream's sink cache
    dense_cache_mb: float  # the DynamicCache of as many rows
    peak_mb: float  # the process so far (resident set, or allocated on the GPU)


@dataclass
class ThroughputReport:
    model: str
    device: str
    threads: int
    size: int
    steps: int
    max_batch: int | None
    prefill: list[Prefill] = field(default_factory=list)
    decode: list[Decode] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as a readable table."""
        cap = f", at most {self.max_batch} rows a forward" if self.max_batch else ""
        out = [
            f"model {self.model} on {self.device}, {self.threads} CPU threads, full cache of "
            f"{self.size}{cap}; median of {self.steps} steps"
        ]
        for row in self.prefill:
            llama = "" if row.llama_cpp is None else f", llama.cpp {row.llama_cpp:.0f} tokens/s"
            out.append(
                f"prefill {row.dtype}, chunks of {PREFILL_CHUNK} (median of {PREFILL_RUNS}): "
                f"sink {row.sink:.0f} tokens/s, "
                f"transformers {row.transformers:.0f} tokens/s{llama}"
            )
        out.append(
            f"{'dtype':>8} {'streams':>7} {'batched':>8} {'sequential':>10} {'transformers':>12} "
            f"{'llama.cpp':>9} {'batched/seq':>11} {'batched/tf':>10} {'batched/llama':>13} "
            f"{'sink MB':>8} {'dense MB':>8} {'peak MB':>8}"
        )
        for row in self.decode:
            llama, versus = f"{'-':>9}", f"{'-':>13}"
            if row.llama_cpp is not None:
                llama, versus = f"{row.llama_cpp:>9.1f}", f"{row.batched / row.llama_cpp:>12.2f}x"
            out.append(
                f"{row.dtype:>8} {row.streams:>7} {row.batched:>8.1f} {row.sequential:>10.1f} "
                f"{row.transformers:>12.1f} {llama} {row.batched / row.sequential:>10.2f}x "
                f"{row.batched / row.transformers:>9.2f}x {versus} {row.sink_cache_mb:>8.1f} "
                f"{row.dense_cache_mb:>8.1f} {row.peak_mb:>8.0f}"
            )
        return out


def run_throughput_benchmark(
    models: Sequence[LoadedModel],
    streams: Sequence[int],
    size: int,
    steps: int,
    max_batch: int | None = None,
    llama: LlamaCpp | None = None,
) -> ThroughputReport:
    """Every figure for each model (one per dtype), with a progress bar on stderr; llama.cpp's
    beside the float32 ones, given `llama`."""
    first = models[0]
    if size > first.max_cache:
        raise CacheCapacityError(f"{first.name} attends to at most {first.max_cache} tokens")
    report = ThroughputReport(
        first.name, str(first.device), torch.get_num_threads(), size, steps, max_batch
    )
    llama_dtypes = sum(loaded.dtype == torch.float32 for loaded in models) if llama else 0
    total = len(models) * (1 + len(PATHS) * len(streams)) + llama_dtypes * len(streams)
    # On stderr, and only on a terminal (disable=None): stdout keeps the table or the JSON.
    with tqdm(
        total=total, desc="bench throughput", unit="figure", leave=False, disable=None
    ) as bar:
        for loaded in models:
            _bench_model(loaded, streams, size, steps, max_batch, report, bar)
            if llama is not None and loaded.dtype == torch.float32:
                _bench_llama(llama, streams, size, steps, report, bar)
    return report


def _bench_llama(
    llama: LlamaCpp,
    streams: Sequence[int],
    size: int,
    steps: int,
    report: ThroughputReport,
    bar: tqdm,
) -> None:
    """llama.cpp's figures into the float32 rows already measured."""
    prefills = []
    for count in streams:
        bar.set_postfix_str(f"float32, {count} streams, llama.cpp")
        prefill, rate = llama.rates(count, size, steps)
        prefills.append(prefill)
        row = next(r for r in report.decode if r.dtype == "float32" and r.streams == count)
        report.decode[report.decode.index(row)] = replace(row, llama_cpp=rate)
        bar.update()
    row = next(r for r in report.prefill if r.dtype == "float32")
    report.prefill[report.prefill.index(row)] = replace(row, llama_cpp=statistics.median(prefills))


def _bench_model(
    loaded: LoadedModel,
    streams: Sequence[int],
    size: int,
    steps: int,
    max_batch: int | None,
    report: ThroughputReport,
    bar: tqdm,
) -> None:
    dtype = str(loaded.dtype).removeprefix("torch.")
    bar.set_postfix_str(f"{dtype} prefill")
    sink_ms = timed_ms(loaded, lambda: filled_cache(loaded, size, size), PREFILL_RUNS)
    dense_ms = timed_ms(loaded, lambda: _dense_cache(loaded, size - 1), PREFILL_RUNS)
    full, dense = filled_cache(loaded, size, size), _dense_cache(loaded, size - 1)
    report.prefill.append(Prefill(dtype, 1000 * size / sink_ms, 1000 * (size - 1) / dense_ms))
    bar.update()
    pool = decoder_pool(len(full.kinds), loaded.device)  # as a worker's decoder keeps them
    streams_at_most = [_copy(loaded, full, pool) for _ in range(max(streams))]
    # On a GPU, one step for every figure: captured (and compiled) once.
    graphs = graph_steps(loaded.model, pool)
    for count in streams:
        caches = streams_at_most[:count]
        plain = _Plain(loaded, dense, count)
        dense_mb = _cache_mb(plain.cache)  # at the length the sink caches hold, before decode
        rates = {}
        for path, step in (
            ("batched", _batched(loaded, caches, max_batch, graphs)),
            ("sequential", _sequential(loaded, caches, graphs)),
            ("transformers", plain),
        ):
            bar.set_postfix_str(f"{dtype}, {count} streams, {path}")
            rates[path] = _rate(loaded, count, steps, step)
            bar.update()
        report.decode.append(
            Decode(
                dtype,
                count,
                **rates,
                llama_cpp=None,
                sink_cache_mb=count * _cache_mb(full),
                dense_cache_mb=dense_mb,
                peak_mb=peak_memory_mb(loaded),
            )
        )


def _rate(loaded: LoadedModel, count: int, steps: int, step: Step) -> float:
    """Tokens per second over `count` streams, from the median step of `steps`."""
    ids = iter(random_ids(loaded, count * (steps + 1), seed=1).view(steps + 1, count))
    with torch.inference_mode():
        milliseconds = timed_ms(loaded, lambda: step(next(ids)), steps)
    return 1000 * count / milliseconds


def _batched(
    loaded: LoadedModel,
    caches: list[SinkCache],
    max_batch: int | None,
    graphs: GraphSteps | None,
) -> Step:
    """The batched path: one forward across the streams, or across each `max_batch` of them
    (one per stream where the model's kernels cannot batch rows, as a worker's decoder runs;
    `graphs`: the fixed-shape step of their pool, on a GPU)."""
    width = max_batch or len(caches)
    batched = is_batch_invariant(loaded.model)

    def step(ids: torch.Tensor) -> None:
        for start in range(0, len(caches), width):
            rows = slice(start, start + width)
            decode_step(loaded.model, caches[rows], ids[rows], batched, graphs=graphs)

    return step


def _sequential(loaded: LoadedModel, caches: list[SinkCache], graphs: GraphSteps | None) -> Step:
    """The sequential path (`--max-batch 1`): one forward per stream, as a lone row."""
    batched = is_batch_invariant(loaded.model)

    def step(ids: torch.Tensor) -> None:
        for cache, token in zip(caches, ids, strict=True):
            decode_step(loaded.model, [cache], token[None], batched, graphs=graphs)

    return step


class _Plain:
    """Plain transformers: the batch in one forward over a DynamicCache of `count` rows."""

    def __init__(self, loaded: LoadedModel, dense: DynamicCache, count: int) -> None:
        self.loaded = loaded
        self.cache = copy.deepcopy(dense)
        self.cache.batch_repeat_interleave(count)

    def __call__(self, ids: torch.Tensor) -> None:
        model = self.loaded.model
        with stock_kernels(model):
            model(
                input_ids=ids[:, None].to(self.loaded.device), **cache_argument(model, self.cache)
            )


def _copy(loaded: LoadedModel, cache: SinkCache, pool: KVPool) -> SinkCache:
    """Another stream in the same state, in a slot of `pool`, through the cache's own
    snapshot."""
    twin = SinkCache.for_model(loaded.model, cache.layout.capacity, SINKS, pool)
    snapshot = cache.snapshot()  # nothing saved yet: it carries every slot
    twin.load(snapshot.tensors, snapshot.meta)
    return twin


@torch.inference_mode()
def _dense_cache(loaded: LoadedModel, length: int) -> DynamicCache:
    """A DynamicCache prefilled with `length` tokens in chunks, as the sink cache is."""
    cache = DynamicCache(config=loaded.model.config)
    with stock_kernels(loaded.model):
        for piece in random_ids(loaded, length).split(PREFILL_CHUNK):
            loaded.model(
                input_ids=piece[None].to(loaded.device),
                use_cache=True,
                logits_to_keep=1,
                **cache_argument(loaded.model, cache),
            )
    return cache


def _cache_mb(cache: Cache) -> float:
    """The keys and values a cache holds, sink or dense."""
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values)) / 2**20
