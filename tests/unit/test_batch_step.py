"""The batched decode step as data: each row's positions, shift, head and mask, no model."""

from __future__ import annotations

import pytest
import torch

from worker.model.batch_step import plan_batch
from worker.model.slot_layout import SlotLayout


def _layout_after(tokens: int, capacity: int = 8, sinks: int = 2) -> SlotLayout:
    layout = SlotLayout(capacity, sinks)
    for _ in range(tokens):
        layout.commit(layout.plan(1))
    return layout


def test_ragged_rows_keep_their_own_positions_and_hide_unfilled_slots() -> None:
    layouts = [_layout_after(2), _layout_after(7), _layout_after(11)]  # short, filling, turned
    plans = [layout.plan(1) for layout in layouts]
    batch = plan_batch(plans, 8, torch.float32, "cpu")
    assert batch.query_positions.tolist() == [[2], [7], [7]]
    # Each row's shift: what it evicted, counting this step's room (11 + 1 tokens in 8 slots).
    assert batch.shifts.tolist() == [0, 0, 4]
    assert batch.head_slots.tolist() == [[True] * 2 + [False] * 6] * 3
    live = batch.attention_mask[:, 0, 0] == 0
    assert live.sum(-1).tolist() == [3, 8, 8]
    assert live[0].tolist() == [True] * 3 + [False] * 5
    assert batch.attention_mask.min() == torch.finfo(torch.float32).min
    assert not batch.window_masks  # no sliding layers


def test_the_mask_is_made_in_the_model_dtype() -> None:
    batch = plan_batch([_layout_after(1).plan(1)], 8, torch.bfloat16, "cpu")
    assert batch.attention_mask.dtype == torch.bfloat16
    assert batch.attention_mask.shape == (1, 1, 1, 8)


def test_only_one_token_per_row_is_batched() -> None:
    with pytest.raises(ValueError, match="one new token per row"):
        plan_batch([_layout_after(1).plan(2)], 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="one new token per row"):
        plan_batch([], 8, torch.float32, "cpu")


def test_a_sliding_window_mask_also_hides_the_slots_too_far_behind_each_query() -> None:
    layouts = [_layout_after(3), _layout_after(11)]  # short; turned (query at position 7)
    plans = [layout.plan(1) for layout in layouts]
    batch = plan_batch(plans, 8, torch.float32, "cpu", windows=[3])
    seen = batch.window_masks[3][:, 0, 0] == 0
    assert seen[0].tolist() == [False, True, True, True] + [False] * 4  # positions 1..3
    positions = plans[1].slot_positions[seen[1]]  # a turned ring: its own order
    assert sorted(positions.tolist()) == [5, 6, 7]  # sinks included: they are too far too
    assert (batch.attention_mask[:, 0, 0] == 0).sum(-1).tolist() == [4, 8]
