"""Tokens into sink caches, and tokens out of them: the model's forwards, and nothing else.

The decoder knows caches, tokens and samplers, not streams or dialogue. Both calls take a list
of items, one per cache. A decode step over many caches (one token each) runs as one batched
forward (see batch_cache.py); prefill runs one forward per item.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.exceptions import CacheCapacityError
from worker.model.batch_cache import batch_forward, can_batch
from worker.model.cache_settings import CacheSettings
from worker.model.compat import cache_argument
from worker.model.loading import LoadedModel
from worker.model.sampling import Sampler
from worker.model.sink_cache import SinkCache


@dataclass(frozen=True)
class GenerationRequest:
    """Feed `prompt` into `cache`, then write up to `max_new_tokens` tokens, each kept there.

    The sampler's processors see `history` and then the tokens written so far.
    """

    cache: SinkCache
    prompt: torch.Tensor  # 1-D: the tokens that close the turn
    sampler: Sampler
    max_new_tokens: int
    stop_ids: frozenset[int]
    history: Sequence[int] = ()


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
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def new_cache(self) -> SinkCache:
        """An empty cache of these settings, on the model's device."""
        return SinkCache.for_model(self.model, self.settings.capacity, self.settings.sinks)

    @torch.inference_mode()
    def feed(self, items: Sequence[tuple[SinkCache, torch.Tensor]]) -> list[torch.Tensor]:
        """Run each item's 1-D tokens into its cache, in pieces of at most `chunk` tokens;
        each item's last logits [vocab].

        Items of one token each (a decode step) run as one forward of them all when every cache
        may be a row of a batch (rotary keys); otherwise (prefill, ALiBi) each runs its own.
        """
        if len(items) > 1 and all(can_batch(cache, tokens) for cache, tokens in items):
            caches = [cache for cache, _ in items]
            return list(batch_forward(self.model, caches, torch.cat([t for _, t in items])))
        return [self._feed_one(cache, tokens) for cache, tokens in items]

    def _feed_one(self, cache: SinkCache, tokens: torch.Tensor) -> torch.Tensor:
        if len(tokens) == 0:
            raise CacheCapacityError("nothing to feed: an empty chunk")
        for piece in tokens.split(self.chunk):
            logits = forward_step(self.model, cache, piece, self._logits_to_keep)[-1]
        return logits

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Each request's written tokens (stop tokens left out), decoded in lock step.

        Every written token goes into its cache, the last one included, so the cache ends
        holding the whole turn.
        """
        written: list[list[int]] = [[] for _ in requests]
        seen = [list(request.history) for request in requests]  # what the processors see
        logits = self.feed([(request.cache, request.prompt) for request in requests])
        live = {i: last for i, last in enumerate(logits) if requests[i].max_new_tokens > 0}
        while live:
            going = []
            for i, last in live.items():
                token = requests[i].sampler.pick(seen[i], last)
                if token not in requests[i].stop_ids:
                    written[i].append(token)
                    seen[i].append(token)
                    going.append(i)
            fed = self.feed([(requests[i].cache, torch.tensor(written[i][-1:])) for i in going])
            live = {
                i: last
                for i, last in zip(going, fed, strict=True)
                if len(written[i]) < requests[i].max_new_tokens
            }
        return written


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
