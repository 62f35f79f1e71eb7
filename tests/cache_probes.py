"""What a test reads off a sink cache, worked out from its public state: where each position's
token lies, and the token ids and stored keys in position order."""

from __future__ import annotations

import torch

from worker.model.sink_cache import SinkCache
from worker.model.slot_layout import SlotLayout


def slot_order(layout: SlotLayout) -> torch.Tensor:
    """Slots of the cached tokens in position order: the head as it lies, then the ring from
    `ring_start` on."""
    positions = torch.arange(layout.length)
    in_ring = layout.head + (layout.ring_start + positions - layout.head) % layout.ring_size
    return torch.where(positions < layout.head, positions, in_ring)


def kept_token_ids(cache: SinkCache) -> torch.Tensor:
    """Token ids of the cached tokens, in position order."""
    return cache.token_ids[slot_order(cache.layout).to(cache.device)].cpu()


def kept_stored_keys(cache: SinkCache, layer_idx: int) -> torch.Tensor:
    """Stored keys of one layer (at their stream positions), in position order (what a drift
    check compares)."""
    layer = cache.layers[layer_idx]
    return layer.keys.index_select(2, slot_order(cache.layout).to(layer.keys.device))
