"""The StreamingLLM cache in the shape transformers uses: one layer object per model layer.

Keys are stored at their stream positions (see positions.py) in ring-buffered slots (see
slot_layout.py) and turned back to their in-cache positions on use by one shift: gathered in
position order for a chunk, read in slot order for a single decoded token once the ring has
turned. A batched decode step reads them as stored (batch_cache.py, attention.py). A forward
must be wrapped in `step()`, which makes room before the new tokens go in and records the new
layout only once the forward has succeeded.

A cache snapshots its tensors and loads them back itself (cache_snapshot.py): it tracks which
slots each forward wrote (snapshot_pieces.py), so a snapshot copies only the slots written
since the last saved one and names the others by the blocks the store already holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from worker.exceptions import CacheDamagedError
from worker.model import cache_snapshot
from worker.model.cache_snapshot import CacheSnapshot
from worker.model.compat import LayerAcrossReleases
from worker.model.kv_pool import KVPool
from worker.model.layer_kinds import LayerKind, layer_kinds
from worker.model.scratch import scratch
from worker.model.slot_layout import SlotLayout, StepPlan
from worker.model.snapshot_pieces import PieceTracker


class SinkCacheLayer(LayerAcrossReleases, CacheLayerMixin):
    """One layer's keys (at stream positions) and values [1, heads, capacity, dims], in slots
    shared with every other layer: views of the cache's slot in its pool (kv_pool.py).

    A sliding layer (see layer_kinds.py) gives attention only the keys its queries can see,
    in position order from its first visible position, and says so in `get_mask_sizes`, so
    the model's own sliding mask lines up with them; while it sees every key, it reads them
    like a full layer.
    """

    def __init__(self, owner: SinkCache, index: int, kind: LayerKind) -> None:
        super().__init__()
        self._owner = owner
        self.index = index
        self.kind = kind
        self.is_sliding = kind.window is not None  # which mask transformers makes for it
        self._written: StepPlan | None = None  # the step whose keys this layer last wrote

    @property
    def length(self) -> int:
        """The tokens this layer holds: in a step, before it writes its new ones or after."""
        plan = self._owner.plan
        if plan is None:
            return self._owner.layout.length
        return plan.length_after if self._written is plan else plan.length_before

    @property
    def keys(self) -> torch.Tensor:
        return self._owner.pool.keys(self.index, self._owner.slot)

    @keys.setter
    def keys(self, unset: None) -> None:
        """transformers' layer sets it None at first; the pool holds it."""

    @property
    def values(self) -> torch.Tensor:
        return self._owner.pool.values(self.index, self._owner.slot)

    @values.setter
    def values(self, unset: None) -> None:
        """transformers' layer sets it None at first; the pool holds it."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The pool's buffers of this layer, made for slots shaped like one row of these."""
        pool, capacity = self._owner.pool, self._owner.layout.capacity
        if not pool.made(self.index):
            heads, key_dims, value_dims = (
                key_states.shape[1],
                key_states.shape[-1],
                value_states.shape[-1],
            )
            pool.make(
                self.index, (heads, capacity, key_dims), (heads, capacity, value_dims), key_states
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan, kind = self._owner.plan, self.kind
        self.write(kind.scheme.to_stored(key_states, self._owner.storing(kind)), value_states)
        first = kind.first_visible(plan.length_before)
        if first == 0 and plan.full_ring and kind.scheme.order_free and plan.new_tokens == 1:
            # One query attends to every slot alike: keys in slot order (the head's slots are
            # its positions), and the values as they lie. No gather, no copy of the values.
            keys, values = self.keys, self.values
        else:
            keys, values = self._in_position_order(plan, first)
        return self._in_cache_frame(keys, max(plan.head - first, 0)), values

    def write(self, stored_keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put this step's new keys (already at their stream positions) and values in their
        slots."""
        plan = self._owner.plan
        if not self.is_initialized:
            self.lazy_initialization(stored_keys, values)
        self.keys.index_copy_(2, plan.new_slots, stored_keys)
        self.values.index_copy_(2, plan.new_slots, values)
        self._written = plan

    def _in_cache_frame(self, keys: torch.Tensor, head: int) -> torch.Tensor:
        """Stored keys, the first `head` of them the head's, turned back to the model's
        in-cache frame (the window's by the step's shift), in a reused buffer."""
        turning = self._owner.turning_back(self.kind, keys.dtype)
        if turning is None:
            return keys
        out = scratch("attention keys", keys.shape, keys.dtype, keys.device)
        out[:, :, :head].copy_(keys[:, :, :head])
        self.kind.scheme.turn(keys[:, :, head:], turning, out[:, :, head:])
        return out

    def _in_position_order(self, plan: StepPlan, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions first..length_after-1, in position order."""
        if isinstance(plan.order, slice):
            span = slice(plan.order.start + first, plan.order.stop)
            return self.keys[:, :, span], self.values[:, :, span]
        order = plan.order[first:]
        return self.keys.index_select(2, order), self.values.index_select(2, order)

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys given to attention, position of the first): what `update` returns."""
        first = self.kind.first_visible(self.length)
        return self.length + query_length - first, first

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._owner.layout.capacity


class SinkCache(Cache):
    """Attention sinks plus a rolling window, positions inside the cache, for every layer."""

    def __init__(
        self,
        kinds: Sequence[LayerKind],
        capacity: int,
        sinks: int = 4,
        device: torch.device | str = "cpu",
        pool: KVPool | None = None,
    ) -> None:
        """`kinds`: one per model layer (see layer_kinds.py; `uniform` for a single scheme);
        `pool`: the buffers it shares with other caches of these kinds and capacity (its own,
        of one slot, if None)."""
        self.layout = SlotLayout(capacity, sinks)
        self.pool = KVPool(len(kinds), chunk_slots=1) if pool is None else pool
        self.slot = self.pool.take(self)
        self.kinds = tuple(kinds)
        self.device = torch.device(device)  # where each step's slot indices are made
        self.plan: StepPlan | None = None
        self._turnings: dict[tuple[str, LayerKind], object] = {}  # this step's, once a kind
        self.token_ids = torch.zeros(capacity, dtype=torch.long)
        self.pieces = PieceTracker(capacity)  # slots written since the last saved snapshot
        self.damaged = False
        layers = [SinkCacheLayer(self, index, kind) for index, kind in enumerate(self.kinds)]
        super().__init__(layers=layers)

    @classmethod
    def for_model(
        cls, model: PreTrainedModel, capacity: int, sinks: int = 4, pool: KVPool | None = None
    ) -> SinkCache:
        """A cache for `model`, on its device, with its layers' kinds."""
        return cls(layer_kinds(model, capacity), capacity, sinks, model.device, pool)

    def clone(self) -> SinkCache:
        """A cache in this one's state, in another slot of its pool, none of it saved: a new
        stream that opens as this one did (the same instruction) without computing it again."""
        twin = SinkCache(
            self.kinds, self.layout.capacity, self.layout.sinks, self.device, self.pool
        )
        twin.layout = SlotLayout.from_meta(self.layout.to_meta())
        twin.token_ids.copy_(self.token_ids)
        filled = self.layout.length  # slots 0..length-1 until the ring turns, then all
        for mine, theirs in zip(self.layers, twin.layers, strict=True):
            if mine.is_initialized:
                theirs.dtype, theirs.device = mine.dtype, mine.device
                theirs.is_initialized = True
                theirs.keys[:, :, :filled] = mine.keys[:, :, :filled]
                theirs.values[:, :, :filled] = mine.values[:, :, :filled]
        twin.pieces.wrote([(0, filled)])
        return twin

    @property
    def order_free(self) -> bool:
        """Whether every layer's keys carry their positions (see PositionScheme.order_free)."""
        return all(kind.scheme.order_free for kind in self.kinds)

    @contextmanager
    def step(
        self, input_ids: torch.Tensor, plan_device: torch.device | str | None = None
    ) -> Iterator[StepPlan]:
        """Run one forward of `input_ids` (1-D) against this cache; commit it if it succeeds.
        The plan's slot indices are made on `plan_device` (default: the cache's device).

        A forward that fails after eviction has overwritten slots that the layout still counts
        as live, so the cache is marked damaged: the stream must be restored from its state.
        """
        plan = self.begin(len(input_ids), plan_device)
        try:
            yield plan
        except BaseException:
            self.abandon()
            raise
        self.commit(input_ids.tolist())

    def begin(self, new_tokens: int, plan_device: torch.device | str | None = None) -> StepPlan:
        """Plan a forward of `new_tokens` (see `step`, which most callers want)."""
        self.require_intact()
        self.plan = self.layout.plan(new_tokens, plan_device or self.device)
        self._turnings = {}
        return self.plan

    def abandon(self) -> None:
        """The planned forward failed (see `step`)."""
        self.damaged = self.plan.evicted > 0
        self.plan = None

    def commit(self, token_ids: Sequence[int]) -> None:
        """The planned forward of `token_ids` succeeded: record its layout and tokens."""
        plan, self.plan = self.plan, None
        self.layout.commit(plan)
        runs = self.layout.slot_runs(plan.length_before, plan.new_tokens)
        self.pieces.wrote(runs)
        # Kept on the host, where they come from and are read; written through numpy, which
        # takes a few ints for a fraction of what a tensor's indexing costs (once a row a step).
        ids, written = self.token_ids.numpy(), 0
        for start, stop in runs:
            ids[start:stop] = token_ids[written : written + stop - start]
            written += stop - start

    def require_intact(self) -> None:
        """Refuse a cache that a failed forward left half-written."""
        if self.damaged:
            raise CacheDamagedError("this cache was damaged by a failed forward; restore its state")

    def storing(self, kind: LayerKind) -> object:
        """The turn of `kind`'s new keys to their stream positions, made by the first layer of
        that kind (see PositionScheme.storing)."""
        return self._once(
            ("storing", kind), lambda: kind.scheme.storing(self.plan.shift, self.device)
        )

    def turning_back(self, kind: LayerKind, dtype: torch.dtype) -> object:
        """The turn of `kind`'s window keys from the stream's frame to this step's in-cache
        frame, made by the first layer of that kind that needs it."""
        return self._once(
            ("back", kind), lambda: kind.scheme.turning(-self.plan.shift, self.device, dtype)
        )

    def _once(self, key: tuple[str, LayerKind], make: Callable[[], object]) -> object:
        """`make()` the first time this step asks for `key`, the same object after."""
        if key not in self._turnings:
            self._turnings[key] = make()
        return self._turnings[key]

    def tokens_of_span(self, start: int, end: int) -> list[int]:
        """The ids of the stream's tokens start..end-1 still in this cache, oldest first."""
        return self.token_ids[self.layout.slots_of_span(start, end)].tolist()

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


@contextmanager
def decode_steps(
    caches: Sequence[SinkCache], tokens: torch.Tensor, plan_device: torch.device | str | None = None
) -> Iterator[list[StepPlan]]:
    """One forward of token i (`tokens` [rows], on the host) into cache i: each cache's plan.
    As `SinkCache.step` for every row at once: each commits once the forward has succeeded."""
    require_rows(caches)
    plans = [cache.begin(1, plan_device) for cache in caches]
    try:
        yield plans
    except BaseException:
        for cache in caches:
            cache.abandon()
        raise
    for cache, token in zip(caches, tokens.tolist(), strict=True):
        cache.commit((token,))


def require_rows(caches: Sequence[SinkCache]) -> None:
    """Refuse caches that cannot be the rows of one decode step, before any of them plans (a
    refusal must damage none): one twice, or one damaged."""
    if len({id(cache) for cache in caches}) != len(caches):
        raise ValueError("a cache can be only one row of a decode step")
    for cache in caches:
        cache.require_intact()
