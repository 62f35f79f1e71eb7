"""One forward of one token for each of many sink caches: a transformers Cache over their rows.

The rows go through the forward in the order of their slots (kv_pool.py), so that the rows of
adjacent slots of one pool form runs: each run's keys and values are one view of the pool's
buffers, read in place by attention (attention.py), with no copy; caches of other pools are
runs of their own. The logits come back in the order the caches were given.

Each layer writes every row's new key (turned to its stream position, see positions.py) and
value into its slot (one kernel call a run, where decode_kernel.py reads the caches); nothing
else is turned, since each row's query is turned instead. The
BatchPlan's mask hides the slots a row has not filled; where layers slide, the model gets one
mask per layer type, and its sliding layers' also hides what they cannot see. Each cache
plans, commits and is marked damaged on a failed forward through its own `step()`, exactly as
when it runs alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from worker.model import decode_forward, decode_kernel
from worker.model.attention import ATTENTION, DecodeFrames, Run, decoding
from worker.model.batch_step import BatchPlan, plan_batch
from worker.model.compat import LayerAcrossReleases, cache_argument
from worker.model.layer_kinds import is_hybrid
from worker.model.sink_cache import SinkCache, decode_steps


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
        """Write every row's new key and value; attention reads the runs (see DecodeFrames),
        so what this returns is the first row's, for the shapes' sake."""
        owner, index = self._owner, self._index
        if owner.fresh:
            for cache in owner.caches:
                if not cache.layers[index].is_initialized:
                    cache.layers[index].lazy_initialization(key_states, value_states)
        first = owner.runs[0]
        views = first.pool.keys(index, first.first_slot), first.pool.values(index, first.first_slot)
        if decode_kernel.takes(*views):
            self._store(key_states, value_states)
        else:
            self._write(key_states, value_states)
        return views

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Through decode_kernel.py: one call a run, its keys turned in it."""
        owner, index = self._owner, self._index
        storing = owner.storings[self.kind]
        whole = len(owner.runs) == 1  # one run of every row: nothing to slice
        for run, rows, _, slots in owner.writes:
            new = (key_states, value_states) if whole else (key_states[rows], value_states[rows])
            turn = storing if whole or storing is None else tuple(t[rows] for t in storing)
            keys = run.pool.keys(index, run.first_slot, run.count)
            values = run.pool.values(index, run.first_slot, run.count)
            decode_kernel.store(keys, values, *new, slots, turn)

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Through torch's ops: the keys turned, then two index writes a run."""
        owner, index = self._owner, self._index
        stored = self.kind.scheme.to_stored(key_states, owner.storings[self.kind])
        for run, rows, each, slots in owner.writes:
            run.pool.keys(index, run.first_slot, run.count)[each, :, slots] = stored[rows, :, 0]
            values = run.pool.values(index, run.first_slot, run.count)
            values[each, :, slots] = value_states[rows, :, 0]

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.capacity, 0

    def get_seq_length(self) -> int:
        """The longest row before the step: a batch has no one length, its position ids and its
        mask say each row's."""
        return max(plan.length_before for plan in self._owner.plan.plans)

    def get_max_length(self) -> int:
        return self._owner.capacity


class BatchCache(Cache):
    """The caches of one batched forward, in slot order, and the plan that forward follows."""

    def __init__(self, caches: Sequence[SinkCache], plan: BatchPlan, mixed_spans: bool) -> None:
        """`mixed_spans`: whether rows attending over different spans may share a run."""
        self.caches = list(caches)
        self.plan = plan
        self.kinds = caches[0].kinds
        self.capacity = caches[0].layout.capacity
        self.runs = _runs(self.caches, plan, mixed_spans)
        # Each row's turn of its new keys to stream positions, made once a step per layer kind.
        device = self.caches[0].device
        self.storings = {kind: kind.scheme.storing(plan.shifts, device) for kind in set(self.kinds)}
        # Where every layer writes, made once a step: each run, its rows in the batch, its rows
        # 0..count-1 in the pool's view, and each row's new slot.
        new_slots = plan.new_slots
        self.writes = []
        for run in self.runs:
            rows = slice(run.first_row, run.first_row + run.count)
            each = torch.arange(run.count, device=new_slots.device)
            self.writes.append((run, rows, each, new_slots[rows]))
        # Whether a row's cache has a layer that has held nothing yet (no buffers to write).
        self.fresh = any(not layer.is_initialized for c in self.caches for layer in c.layers)
        super().__init__(layers=[BatchCacheLayer(self, i) for i in range(len(self.kinds))])

    def frames(self, dtype: torch.dtype) -> DecodeFrames:
        """What attention needs: the runs, and each row's query turn (one per layer kind)."""
        device, shifts = self.caches[0].device, self.plan.shifts
        turnings = {kind: kind.scheme.turning(shifts, device, dtype) for kind in set(self.kinds)}
        return DecodeFrames(
            [kind.scheme for kind in self.kinds],
            [turnings[kind] for kind in self.kinds],
            self.plan.head_slots,
            self.runs,
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


ATTENDED_BLOCK = 128  # a row attends over its filled slots rounded up to this many


def attended(length: int, capacity: int) -> int:
    """How many leading slots a row holding `length` tokens attends over: its own length
    rounded up, so a young stream reads less. Once the ring turns, every slot is filled."""
    return min(-(-length // ATTENDED_BLOCK) * ATTENDED_BLOCK, capacity)


def sums_in_slot_order(cache: SinkCache) -> bool:
    """Whether attention reads this cache through decode_kernel.py, whose sums run over the
    slots in order: there the slots a shorter row of a run has not filled (masked) add exact
    zeros after its own, so rows of any spans may share a run without a bit changing. torch's
    matmuls may block a sum by its length, so elsewhere a run takes rows of one span."""
    layer = cache.layers[0]
    return layer.is_initialized and decode_kernel.takes(layer.keys, layer.values)


def _runs(caches: Sequence[SinkCache], plan: BatchPlan, mixed_spans: bool) -> tuple[Run, ...]:
    """Rows (already in run order, see `_run_order`) of adjacent slots of one pool, as runs,
    each attending over the slots its longest row does: one kernel call a layer per run."""
    runs: list[Run] = []
    for row, (cache, step) in enumerate(zip(caches, plan.plans, strict=True)):
        span = attended(step.length_after, cache.layout.capacity)
        last = runs[-1] if runs else None
        if (
            last
            and last.pool is cache.pool
            and (mixed_spans or last.span == span)
            and last.first_slot + last.count == cache.slot
            and cache.pool.same_chunk(last.first_slot, cache.slot)
        ):
            span = max(span, last.span)
            runs[-1] = Run(last.pool, last.first_row, last.first_slot, last.count + 1, span)
        else:
            runs.append(Run(cache.pool, row, cache.slot, 1, span))
    return tuple(runs)


def _run_order(cache: SinkCache, mixed_spans: bool) -> tuple[int, int, int]:
    """Where a cache's row goes in the batch: in slot order, rows of one span together where
    a run takes one span only, so the rows make as few runs as they can."""
    span = 0 if mixed_spans else attended(cache.layout.length + 1, cache.layout.capacity)
    return id(cache.pool), span, cache.slot


def batch_forward(
    model: torch.nn.Module, caches: Sequence[SinkCache], tokens: torch.Tensor
) -> torch.Tensor:
    """One forward of tokens [rows], one per cache, each cache taking its own: logits [rows,
    vocab]. Each cache commits its step only once the forward has succeeded."""
    if model.config._attn_implementation != ATTENTION:
        raise ValueError("a batched step needs streamsink's attention (see batch_invariance.py)")
    mixed_spans = sums_in_slot_order(caches[0])
    order = sorted(range(len(caches)), key=lambda i: _run_order(caches[i], mixed_spans))
    rows, tokens = [caches[i] for i in order], tokens[order]
    with decode_steps(rows, tokens) as plans:
        windows = {kind.window for kind in rows[0].kinds if kind.window}
        capacity = rows[0].layout.capacity
        plan = plan_batch(plans, capacity, model.dtype, model.device, windows)
        batch = BatchCache(rows, plan, mixed_spans)
        ids = tokens.to(model.device)
        frames = batch.frames(model.dtype)
        with decoding(frames):
            if decode_forward.takes(model, batch):
                logits = decode_forward.forward(model, batch, frames, ids, plan.query_positions)
            else:
                logits = model(
                    input_ids=ids[:, None],
                    position_ids=plan.query_positions,
                    attention_mask=batch.attention_mask(),
                    **cache_argument(model, batch),
                    use_cache=True,
                ).logits[:, -1]
    return logits[torch.tensor(order).argsort()]
