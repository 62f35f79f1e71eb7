"""One forward of one token for each of many sink caches: a transformers Cache over their rows.

Each layer writes every row's new key (turned to its stream position, see positions.py) and
value into that row's own SinkCache, then gives attention every row's keys and values as
stored, in slot order, gathered into one batch [rows, heads, capacity, dims]: nothing is
rotated but the new keys, and each row's query is turned instead (attention.py, told by
`decoding`). The BatchPlan's mask hides the slots a row has not filled; where layers slide,
the model gets one mask per layer type, and its sliding layers' also hides what they cannot
see. Each cache plans, commits and is marked damaged on a failed forward through its own
`step()`, exactly as when it runs alone.

The rows' keys and values are gathered (copied) into buffers that every layer and step reuses
(scratch.py): nothing is allocated per layer. Caches that shared one buffer per layer, a row
each, would let attention read them in place, without the copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from worker.model.attention import ATTENTION, DecodeFrames, decoding
from worker.model.batch_step import BatchPlan, plan_batch
from worker.model.compat import LayerAcrossReleases, cache_argument
from worker.model.layer_kinds import is_hybrid
from worker.model.scratch import scratch
from worker.model.sink_cache import SinkCache


class BatchCacheLayer(LayerAcrossReleases, CacheLayerMixin):
    """One model layer over the same layer of every row's cache."""

    def __init__(self, owner: BatchCache, index: int) -> None:
        super().__init__()
        self._owner = owner
        self._index = index
        self.kind = owner.kinds[index]
        self.is_sliding = self.kind.window is not None
        self.is_initialized = True  # the rows hold the tensors

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to make: each row's own layer makes its buffers on first use."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self._owner
        rows = [cache.layers[self._index] for cache in owner.caches]
        stored = self.kind.scheme.to_stored(key_states, owner.plan.shifts)
        for row, layer in enumerate(rows):
            layer.write(stored[row : row + 1], value_states[row : row + 1])
        keys = _gathered([layer.keys for layer in rows], "batch stored keys")
        return keys, _gathered([layer.values for layer in rows], "batch values")

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.capacity, 0

    def get_seq_length(self) -> int:
        """The longest row before the step: a batch has no one length, its position ids and its
        mask say each row's."""
        return max(plan.length_before for plan in self._owner.plan.plans)

    def get_max_length(self) -> int:
        return self._owner.capacity


class BatchCache(Cache):
    """The caches of one batched forward, row by row, and the plan that forward follows."""

    def __init__(self, caches: Sequence[SinkCache], plan: BatchPlan) -> None:
        self.caches = list(caches)
        self.plan = plan
        self.kinds = caches[0].kinds
        self.capacity = caches[0].layout.capacity
        super().__init__(layers=[BatchCacheLayer(self, i) for i in range(len(self.kinds))])

    def frames(self, dtype: torch.dtype) -> DecodeFrames:
        """What attention needs to turn each row's query (one turning per layer kind)."""
        device, shifts = self.caches[0].device, self.plan.shifts
        turnings = {kind: kind.scheme.turning(shifts, device, dtype) for kind in set(self.kinds)}
        return DecodeFrames(
            [kind.scheme for kind in self.kinds],
            [turnings[kind] for kind in self.kinds],
            self.plan.head_slots,
        )

    def attention_mask(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mask the model takes: one tensor, or one per layer type where layers slide."""
        if not is_hybrid(self.kinds):
            return self.plan.attention_mask
        plan = self.plan
        return {
            kind.name: plan.window_masks[kind.window] if kind.window else plan.attention_mask
            for kind in self.kinds
        }


def _gathered(tensors: list[torch.Tensor], purpose: str) -> torch.Tensor:
    """The rows' tensors as one batch, in a buffer that every layer and step reuses."""
    first = tensors[0]
    out = scratch(purpose, (len(tensors), *first.shape[1:]), first.dtype, first.device)
    return torch.cat(tensors, out=out)


def batch_forward(
    model: torch.nn.Module, caches: Sequence[SinkCache], tokens: torch.Tensor
) -> torch.Tensor:
    """One forward of tokens [rows], one per cache, each cache taking its own: logits [rows,
    vocab]. Each cache commits its step only once the forward has succeeded."""
    if len({id(cache) for cache in caches}) != len(caches):
        raise ValueError("a cache can be only one row of a batched step")
    if model.config._attn_implementation != ATTENTION:
        raise ValueError("a batched step needs streamsink's attention (see batch_invariance.py)")
    for cache in caches:
        cache.require_intact()  # before any cache plans: a refusal must damage none
    with ExitStack() as steps:
        plans = [steps.enter_context(c.step(t[None])) for c, t in zip(caches, tokens, strict=True)]
        windows = {kind.window for kind in caches[0].kinds if kind.window}
        capacity = caches[0].layout.capacity
        plan = plan_batch(plans, capacity, model.dtype, model.device, windows)
        batch = BatchCache(caches, plan)
        with decoding(batch.frames(model.dtype)):
            out = model(
                input_ids=tokens[:, None].to(model.device),
                position_ids=plan.query_positions,
                attention_mask=batch.attention_mask(),
                **cache_argument(model, batch),
                use_cache=True,
            )
    return out.logits[:, -1]
