"""Perplexity token by token under four cache policies: the paper's comparison on any text.

dense keeps every token; window keeps the most recent ones only (no sinks); sink keeps the
sinks plus the window; recompute scores each token after a fresh forward over the last C
tokens (the sliding window with re-computation, the quality reference and the slow one).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import DynamicCache

from worker.exceptions import CacheCapacityError
from worker.model.compat import cache_argument
from worker.model.decoder import forward_step
from worker.model.loading import LoadedModel
from worker.model.sink_cache import SinkCache
from worker.tools.measure import peak_memory_mb


class EvalMode(StrEnum):
    DENSE = "dense"
    WINDOW = "window"
    SINK = "sink"
    RECOMPUTE = "recompute"


@dataclass(frozen=True)
class EvalResult:
    mode: str
    tokens: int
    perplexity: float
    ms_per_token: float
    peak_memory_mb: float
    cache_tokens: int
    cache_mb: float

    def to_json_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.mode:>9}: ppl {self.perplexity:9.3f}  tokens {self.tokens}  "
            f"{self.ms_per_token:7.2f} ms/token  peak {self.peak_memory_mb:8.1f} MB  "
            f"cache {self.cache_tokens} tokens ({self.cache_mb:.2f} MB)"
        )


Scorer = Callable[[int], torch.Tensor]  # position t -> logits predicting token t + 1


def evaluate_perplexity(
    loaded: LoadedModel,
    text: str,
    mode: EvalMode,
    sinks: int = 4,
    window: int = 252,
    max_tokens: int = 2000,
    progress: Console | None = None,
) -> EvalResult:
    ids = torch.tensor(loaded.tokenizer(text)["input_ids"][: max_tokens + 1], dtype=torch.long)
    if len(ids) < 2:
        raise ValueError("the text has fewer than two tokens; give a longer text")
    capacity = sinks + window
    if mode is EvalMode.DENSE and len(ids) > loaded.max_cache:
        raise CacheCapacityError(
            f"dense attention over {len(ids)} tokens exceeds the model's {loaded.max_cache} "
            "positions; lower --max-tokens"
        )
    score, cache = _scorer(loaded, ids, mode, sinks, capacity)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    nll = 0.0
    started = time.perf_counter()
    with torch.inference_mode(), Progress(console=progress, transient=True) as bar:
        task = bar.add_task(f"scoring ({mode})", total=len(ids) - 1)
        for t in range(len(ids) - 1):
            logits = score(t).float()
            nll -= torch.log_softmax(logits, dim=-1)[ids[t + 1]].item()
            bar.advance(task)
    elapsed = time.perf_counter() - started
    scored = len(ids) - 1
    return EvalResult(
        mode=str(mode),
        tokens=scored,
        perplexity=math.exp(nll / scored),
        ms_per_token=1000 * elapsed / scored,
        peak_memory_mb=peak_memory_mb(loaded),
        cache_tokens=_cache_tokens(cache, scored, capacity),
        cache_mb=_cache_bytes(cache) / 2**20,
    )


def _scorer(
    loaded: LoadedModel, ids: torch.Tensor, mode: EvalMode, sinks: int, capacity: int
) -> tuple[Scorer, object]:
    model = loaded.model
    if mode is EvalMode.RECOMPUTE:
        # Only the last position's logits are scored: a large vocabulary (Gemma's 262k) would
        # otherwise cost as much as the rest of the forward.
        last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        keep = {"logits_to_keep": 1} if last_only else {}

        def recompute(t: int) -> torch.Tensor:
            context = ids[max(0, t + 1 - capacity) : t + 1]
            return model(input_ids=context[None].to(model.device), **keep).logits[0, -1]

        return recompute, None
    if mode is EvalMode.DENSE:
        dense = DynamicCache(config=model.config)

        def dense_step(t: int) -> torch.Tensor:
            token = ids[t : t + 1][None].to(model.device)
            return model(input_ids=token, use_cache=True, **cache_argument(model, dense)).logits[
                0, -1
            ]

        return dense_step, dense
    kept_sinks = sinks if mode is EvalMode.SINK else 0
    cache = SinkCache.for_model(model, capacity, kept_sinks)
    return (lambda t: forward_step(model, cache, ids[t : t + 1])[-1]), cache


def _cache_tokens(cache: object, scored: int, capacity: int) -> int:
    if cache is None:
        return min(scored, capacity)
    return cache.get_seq_length()


def _cache_bytes(cache: object) -> int:
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total
