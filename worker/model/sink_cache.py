"""The StreamingLLM cache in the shape transformers uses: one layer object per model layer.

Keys are stored position-free (see positions.py) in ring-buffered slots (see slot_layout.py)
and given their in-cache positions on use: gathered in position order for a chunk, read in slot
order for a single decoded token once the ring has turned. A forward must be wrapped in
`step()`, which makes room before the new tokens go in and records the new layout only once
the forward has succeeded.

A cache snapshots its tensors and loads them back itself (cache_snapshot.py): it tracks which
slots each forward wrote (snapshot_pieces.py), so a snapshot copies only the slots written
since the last saved one and names the others by the blocks the store already holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from worker.exceptions import CacheDamagedError
from worker.model import cache_snapshot
from worker.model.cache_snapshot import CacheSnapshot
from worker.model.positions import PositionScheme, scheme_for
from worker.model.slot_layout import SlotLayout, StepPlan
from worker.model.snapshot_pieces import PieceTracker


class SinkCacheLayer(CacheLayerMixin):
    """One layer's keys (position-free) and values, in slots shared with every other layer."""

    is_sliding = False

    def __init__(self, owner: SinkCache) -> None:
        super().__init__()
        self._owner = owner
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = self._owner.layout.capacity
        batch, heads = key_states.shape[:2]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(batch, heads, capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan, scheme = self._owner.plan, self._owner.scheme
        self.write(scheme.to_stored(key_states, plan.length_before), value_states)
        if plan.full_ring and scheme.order_free and len(plan.new_slots) == 1:
            # One query attends to every slot alike: keys in slot order, rotated to each
            # slot's position, and the values as they lie. No gather, no copy of the values.
            keys, values, positions = self.keys, self.values, plan.slot_positions
        else:
            keys, values = self._in_position_order(plan)
            positions = plan.length_after
        return scheme.to_attention(keys, self._owner.rotation(positions, keys.dtype)), values

    def write(self, stored_keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put this step's new keys (already position-free) and values in their slots."""
        plan = self._owner.plan
        if not self.is_initialized:
            self.lazy_initialization(stored_keys, values)
        self.keys.index_copy_(2, plan.new_slots, stored_keys)
        self.values.index_copy_(2, plan.new_slots, values)
        self.length = plan.length_after

    def _in_position_order(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(plan.order, slice):
            return self.keys[:, :, plan.order], self.values[:, :, plan.order]
        return self.keys.index_select(2, plan.order), self.values.index_select(2, plan.order)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._owner.layout.capacity


class SinkCache(Cache):
    """Attention sinks plus a rolling window, positions inside the cache, for every layer."""

    def __init__(
        self,
        scheme: PositionScheme,
        num_layers: int,
        capacity: int,
        sinks: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        self.layout = SlotLayout(capacity, sinks)
        self.scheme = scheme
        self.device = torch.device(device)  # where each step's slot indices are made
        self.plan: StepPlan | None = None
        self._rotation: object = None  # the step's key rotation, shared by every layer
        self.token_ids = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.pieces = PieceTracker(capacity)  # slots written since the last saved snapshot
        self.damaged = False
        super().__init__(layers=[SinkCacheLayer(self) for _ in range(num_layers)])

    @classmethod
    def for_model(cls, model: PreTrainedModel, capacity: int, sinks: int = 4) -> SinkCache:
        """A cache for `model`, on its device, with its architecture's position scheme."""
        scheme = scheme_for(model, capacity)
        return cls(scheme, model.config.num_hidden_layers, capacity, sinks, model.device)

    @contextmanager
    def step(self, input_ids: torch.Tensor) -> Iterator[StepPlan]:
        """Run one forward of `input_ids` (1-D) against this cache; commit it if it succeeds.

        A forward that fails after eviction has overwritten slots that the layout still counts
        as live, so the cache is marked damaged: the stream must be restored from its state.
        """
        self.require_intact()
        plan = self.layout.plan(len(input_ids), self.device)
        self.plan = plan
        self._rotation = None
        for layer in self.layers:
            layer.length = plan.length_before
        try:
            yield plan
        except BaseException:
            for layer in self.layers:
                layer.length = self.layout.length
            self.damaged = plan.evicted > 0
            raise
        finally:
            self.plan = None
        self.layout.commit(plan)
        self.pieces.wrote(self.layout.slot_runs(plan.length_before, len(plan.new_slots)))
        # Kept on the cache's device: no host round trip on every decoded token.
        self.token_ids[plan.new_slots] = input_ids.to(self.device)

    def require_intact(self) -> None:
        """Refuse a cache that a failed forward left half-written."""
        if self.damaged:
            raise CacheDamagedError("this cache was damaged by a failed forward; restore its state")

    def rotation(self, positions: torch.Tensor | int, dtype: torch.dtype) -> object:
        """The scheme's rotation for this step, made by the first layer that needs it."""
        if self._rotation is None:
            self._rotation = self.scheme.rotation(positions, self.device, dtype)
        return self._rotation

    def pin(self, prefix_tokens: int) -> None:
        self.layout.pin(prefix_tokens)

    def snapshot(self) -> CacheSnapshot:
        """Token ids, the slots written since the last saved snapshot (copied) and the names of
        the saved pieces of the others; `saved` once it is committed."""
        return cache_snapshot.take(self)

    def saved(self, snapshot: CacheSnapshot) -> None:
        """`snapshot` was committed: the next one carries only what was written after it."""
        if snapshot.plan is not None:
            self.pieces.saved(snapshot.plan)

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> None:
        """Take back what snapshots gave (meta may hold more keys) into this empty cache."""
        cache_snapshot.load(self, tensors, meta)
