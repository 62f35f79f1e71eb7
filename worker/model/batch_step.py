"""One decode forward over many sink caches, decided before the forward, like `StepPlan`.

Each row is one stream's cache taking one token, with its own layout, positions and eviction
(its own StepPlan). Every row attends over all `capacity` slots of its cache, in slot order: a
row whose ring has turned holds a position in every slot (its plan's `slot_positions`); a row
whose ring has not turned holds position i in slot i, and the mask hides its slots beyond its
length. Rotary keys carry their positions, so for one query the order of the slots changes
nothing (each row's shift and head say which frame a slot's key is in: attention.py). ALiBi's
bias follows a key's index instead, so ALiBi caches are never batched. Sliding layers get a
mask of their own per window, which also hides every slot too far behind the row's query.

This module is pure bookkeeping (no model), so it is tested on its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from worker.model.slot_layout import StepPlan


@dataclass(frozen=True)
class BatchPlan:
    """What one batched decode forward gives the model and each row's cache."""

    plans: tuple[StepPlan, ...]  # each row's own step, committed by its own cache
    query_positions: torch.Tensor  # [rows, 1]: each new token's in-cache position
    attention_mask: torch.Tensor  # [rows, 1, 1, capacity]: 0 where a slot is live, else -inf-ish
    shifts: torch.Tensor  # [rows], on the CPU: each row's shift (see StepPlan.shift)
    new_slots: torch.Tensor  # [rows]: each row's new slot
    head_slots: torch.Tensor  # [rows, capacity], bool: the slots of each row's head
    # window -> the mask of sliding layers with that window: also hides every slot whose
    # position is window or more behind the row's query
    window_masks: Mapping[int, torch.Tensor] = field(default_factory=dict)


def plan_batch(
    plans: Sequence[StepPlan],
    capacity: int,
    dtype: torch.dtype,
    device: torch.device | str,
    windows: Collection[int] = (),
) -> BatchPlan:
    """The batch of these one-token steps over caches of `capacity` slots; the masks in the
    model's `dtype`, as its attention adds them to the scores, one more per sliding window."""
    if not plans or any(plan.new_tokens != 1 for plan in plans):
        raise ValueError("a batched decode step takes exactly one new token per row")
    every_slot = torch.arange(capacity, device=device)
    lengths = torch.tensor([plan.length_after for plan in plans], device=device)
    hidden = every_slot[None] >= lengths[:, None]
    positions = torch.tensor([[plan.length_before] for plan in plans], device=device)
    window_masks = {}
    if windows:
        slot_positions = torch.stack(
            [plan.slot_positions.to(device) if plan.full_ring else every_slot for plan in plans]
        )
        window_masks = {
            window: _mask(hidden | (positions - slot_positions >= window), dtype)
            for window in sorted(set(windows))
        }
    heads = torch.tensor([plan.head for plan in plans], device=device)
    return BatchPlan(
        tuple(plans),
        positions,
        _mask(hidden, dtype),
        torch.tensor([plan.shift for plan in plans]),
        torch.tensor([slot for plan in plans for slot in plan.new_slot_list], device=device),
        every_slot[None] < heads[:, None],
        window_masks,
    )


def _mask(hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, 1, capacity]: 0 where a key is seen, the dtype's lowest value where not."""
    mask = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
    mask.masked_fill_(hidden, torch.finfo(dtype).min)
    return mask[:, None, None]
