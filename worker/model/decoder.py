"""Tokens into sink caches: the model's forwards, and nothing else.

The decoder knows caches and tokens, not streams, dialogue or sampling. It runs two kinds of
forward: a prefill (one cache, many tokens, in chunks) and a decode step (many caches, one
token each). A decode step runs as one batched forward of every row (see batch_cache.py) when
the model's kernels make a row's result independent of the others (batch_invariance.py) and
its keys carry their positions (rotary); a lone row then takes the same path, so its bits do
not depend on whether it had company. On a GPU the step has one fixed shape, replayed from a
CUDA graph (graph_step.py). Otherwise each row runs its own forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from worker.exceptions import CacheCapacityError
from worker.model.batch_cache import batch_forward
from worker.model.batch_invariance import is_batch_invariant
from worker.model.cache_settings import CacheSettings
from worker.model.compat import cache_argument
from worker.model.graph_step import GraphSteps, graph_steps
from worker.model.kv_pool import decoder_pool
from worker.model.layer_kinds import layer_types
from worker.model.loading import LoadedModel
from worker.model.sink_cache import SinkCache


class Decoder:
    def __init__(self, loaded: LoadedModel, settings: CacheSettings) -> None:
        if settings.capacity > loaded.max_cache:
            raise CacheCapacityError(
                f"a cache of {settings.capacity} tokens exceeds what {loaded.name} can attend "
                f"to ({loaded.max_cache}); lower --window"
            )
        self.model = loaded.model
        self.settings = settings
        # A piece must fit the window that is left once a pinned prefix takes its half.
        self.chunk = min(settings.max_chunk, settings.window // 2)
        self.stop_ids = stop_token_ids(loaded)
        self.batch_invariant = is_batch_invariant(self.model)  # else each row runs alone
        # every cache of this decoder
        self.pool = decoder_pool(len(layer_types(self.model.config)), self.model.device)
        self.graphs = graph_steps(self.model, self.pool)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def new_cache(self) -> SinkCache:
        """An empty cache of these settings, on the model's device, a slot of the pool."""
        settings = self.settings
        return SinkCache.for_model(self.model, settings.capacity, settings.sinks, self.pool)

    @torch.inference_mode()
    def prefill(self, cache: SinkCache, tokens: torch.Tensor) -> torch.Tensor:
        """Run 1-D `tokens` into `cache` in pieces of at most `chunk`; the last logits [vocab]."""
        if len(tokens) == 0:
            raise CacheCapacityError("nothing to feed: an empty chunk")
        for piece in tokens.split(self.chunk):
            logits = forward_step(self.model, cache, piece, self._logits_to_keep)[-1]
        return logits

    @torch.inference_mode()
    def decode(self, caches: Sequence[SinkCache], tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: token i [rows] into cache i; the logits [rows, vocab]."""
        return decode_step(
            self.model, caches, tokens, self.batch_invariant, self._logits_to_keep, self.graphs
        )


def decode_step(
    model: torch.nn.Module,
    caches: Sequence[SinkCache],
    tokens: torch.Tensor,
    batch_invariant: bool,
    last_only: bool = False,
    graphs: GraphSteps | None = None,
) -> torch.Tensor:
    """Token i [rows] into cache i, the logits [rows, vocab]: the fixed-shape step where
    `graphs` (of the caches' pool) takes them, else one batched forward where the model is
    `batch_invariant` (is_batch_invariant) and every cache order-free, else one forward per
    row."""
    if graphs is not None and graphs.takes(caches):
        return graphs.decode(caches, tokens)
    if batch_invariant and all(cache.order_free for cache in caches):
        return batch_forward(model, caches, tokens)
    return torch.stack(
        [
            forward_step(model, cache, token[None], last_only)[-1]
            for cache, token in zip(caches, tokens, strict=True)
        ]
    )


def forward_step(
    model: torch.nn.Module, cache: SinkCache, tokens: torch.Tensor, last_only: bool = False
) -> torch.Tensor:
    """One forward of 1-D `tokens` through `cache`: logits [tokens (or 1), vocab]."""
    kwargs = {"logits_to_keep": 1} if last_only else {}
    with cache.step(tokens):
        out = model(
            input_ids=tokens[None].to(model.device),
            use_cache=True,
            **cache_argument(model, cache),
            **kwargs,
        )
    return out.logits[0]


def stop_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """The tokenizer's end token and the generation config's, whichever are set."""
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)
