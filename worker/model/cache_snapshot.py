"""A sink cache's tensors to and from a saved state, in the pieces snapshot_pieces.py plans.

A piece is one tensor [layers, 2 (keys, values), batch, heads, slots, head_dim] of the slots
it holds, copied once from every layer into host memory (pinned on a GPU, one wait for all the
copies). A load copies each piece into its slots of every layer, in the cache's slot of its
pool (kv_pool.py): no concatenation, and the saved tensors may be read-only views of the bytes
a store read.
States of the format before pieces (64-slot blocks per layer and kind, 'layer{i}.keys.{block}')
load too; the next snapshot of such a cache carries every slot. So do states whose keys were
saved position-free (before they were saved at their stream positions): they are turned as they
load, and their next snapshot carries every slot too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from worker.model.slot_layout import SlotLayout
from worker.model.snapshot_pieces import Piece, SnapshotPlan

if TYPE_CHECKING:
    from worker.model.sink_cache import SinkCache, SinkCacheLayer

LEGACY_BLOCK_SLOTS = 64  # slots per block of the states saved before pieces
# How the saved keys are turned (meta "keys"): to their stream positions. States without it
# were saved position-free, and are turned as they load.
KEYS_AT_STREAM_POSITIONS = "stream"


@dataclass(frozen=True)
class CacheSnapshot:
    """What a snapshot carries (token ids, new pieces: host tensors no one else holds), the
    names of the saved pieces it names by their blocks instead, and the cache's meta."""

    tensors: dict[str, torch.Tensor]
    kept: tuple[str, ...]
    meta: dict[str, object]
    plan: SnapshotPlan | None  # None: no layer holds anything yet


def take(cache: SinkCache) -> CacheSnapshot:
    """Copy what changed since the last saved snapshot; the cache may go on at once after."""
    layers = [layer for layer in cache.layers if layer.is_initialized]
    tensors: dict[str, torch.Tensor] = {"token_ids": cache.token_ids.clone()}
    meta: dict[str, object] = {
        "layout": cache.layout.to_meta(),
        "layers": len(layers),
        "keys": KEYS_AT_STREAM_POSITIONS,
    }
    if not layers:
        return CacheSnapshot(tensors, (), meta, None)
    plan = cache.pieces.plan()
    pinned = cache.device.type == "cuda"
    for piece in plan.new:
        tensors[piece.name] = _copy_out(layers, piece, pinned)
    if pinned:
        torch.cuda.current_stream(cache.device).synchronize()
    return CacheSnapshot(tensors, tuple(piece.name for piece in plan.kept), meta, plan)


def load(cache: SinkCache, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> None:
    """Take back what snapshots gave (meta may hold more keys) into this empty cache."""
    layout = SlotLayout.from_meta(meta["layout"])
    if (layout.capacity, layout.sinks) != (cache.layout.capacity, cache.layout.sinks):
        raise ValueError(
            f"a saved cache of {layout.capacity} tokens with {layout.sinks} sinks does not "
            f"fit one of {cache.layout.capacity} with {cache.layout.sinks}; use the same sizes"
        )
    cache.layout = layout
    cache.token_ids = tensors["token_ids"].clone()
    layers = cache.layers[: meta["layers"]]
    pieces = sorted((piece, name) for name in tensors if (piece := Piece.parse(name)) is not None)
    if layers and pieces:
        _lay_down(cache, layers, [(piece, tensors[name]) for piece, name in pieces])
        cache.pieces.restored(piece for piece, _ in pieces)
    else:
        _load_legacy(cache, layers, tensors)
        cache.pieces.forget()
    if layers and meta.get("keys") != KEYS_AT_STREAM_POSITIONS:
        positions = layout.stream_positions().to(cache.device)
        for layer in layers:
            layer.keys.copy_(layer.kind.scheme.from_position_free(layer.keys, positions))
        cache.pieces.forget()  # the saved blocks hold them position-free: save every slot anew
    for layer in layers:
        layer.dtype, layer.device = layer.keys.dtype, layer.keys.device
        layer.is_initialized = True


def _copy_out(layers: Sequence[SinkCacheLayer], piece: Piece, pinned: bool) -> torch.Tensor:
    first = layers[0].keys
    batch, heads, _, dim = first.shape
    shapes = {shape for layer in layers for shape in (layer.keys.shape, layer.values.shape)}
    if len(shapes) > 1:
        raise ValueError("a cache whose layers differ in shape cannot be saved in pieces")
    size = (len(layers), 2, batch, heads, piece.stop - piece.start, dim)
    out = torch.empty(size, dtype=first.dtype, pin_memory=pinned)
    for index, layer in enumerate(layers):
        out[index, 0].copy_(layer.keys[:, :, piece.start : piece.stop], non_blocking=pinned)
        out[index, 1].copy_(layer.values[:, :, piece.start : piece.stop], non_blocking=pinned)
    return out


def _lay_down(
    cache: SinkCache,
    layers: Sequence[SinkCacheLayer],
    pieces: list[tuple[Piece, torch.Tensor]],
) -> None:
    """Each piece into its slots of every layer's buffers (in the cache's pool).

    The pieces are checked before anything is allocated or written: whatever a damaged state
    holds, the buffers are no larger than the pieces that cover them."""
    capacity = cache.layout.capacity
    first = pieces[0][1]
    batch, heads, dim = (
        (first.shape[2], first.shape[3], first.shape[5]) if first.dim() == 6 else (0, 0, 0)
    )
    size = (len(layers), 2, batch, heads, capacity, dim)
    covered = 0
    for piece, tensor in pieces:
        span = piece.stop - piece.start
        fits = 0 < span <= capacity - piece.start and tensor.shape == (*size[:4], span, dim)
        if not fits or tensor.dtype != first.dtype or first.dim() != 6 or batch != 1:
            raise ValueError(
                f"saved piece {piece.name} ({tensor.dtype} {list(tensor.shape)}) does not fit "
                f"a cache of {len(layers)} layers and {capacity} slots; the state is damaged"
            )
        covered = _cover(covered, piece)
    if covered != (1 << capacity) - 1:
        raise ValueError("the saved pieces leave slots of the cache empty; the state is incomplete")
    like = torch.empty(0, dtype=first.dtype, device=cache.device)
    for layer in layers:
        _make_buffers(cache, layer, (heads, capacity, dim), like)
    for piece, tensor in pieces:
        for index, layer in enumerate(layers):
            for kind, buffer in enumerate((layer.keys, layer.values)):
                _copy_into(buffer[:, :, piece.start : piece.stop], tensor[index, kind])


def _make_buffers(
    cache: SinkCache, layer: SinkCacheLayer, slot: tuple[int, ...], like: torch.Tensor
) -> None:
    """The layer's buffers in the cache's pool, for slots of this shape; a pool made for
    another shape (a state of another model) refuses."""
    pool = cache.pool
    if not pool.made(layer.index):
        pool.make(layer.index, slot, slot, like)
    made = pool.keys(layer.index, cache.slot)
    if made.shape[1:] != slot or made.dtype != like.dtype:
        raise ValueError(
            f"a saved layer of {like.dtype} {list(slot)} does not fit this cache's "
            f"{made.dtype} {list(made.shape[1:])}; the state is of another model"
        )


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """On the CPU, a memcpy of each run on this thread (numpy): torch splits a copy this big
    over its threads, which was 3-4x slower on a busy 2-core host. Bytes, any dtype."""
    if target.device.type != "cpu":
        target.copy_(source)
        return
    np.copyto(target.view(torch.uint8).numpy(), source.view(torch.uint8).numpy())


def _cover(covered: int, piece: Piece) -> int:
    """`covered`, a bit per slot, with the piece's slots set."""
    return covered | ((1 << (piece.stop - piece.start)) - 1) << piece.start


def _load_legacy(
    cache: SinkCache, layers: Sequence[SinkCacheLayer], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Blocks of LEGACY_BLOCK_SLOTS slots per layer and kind, each copied into its slots."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        owner, _, rest = name.partition(".")
        by_layer.setdefault(owner, {})[rest] = tensor
    for index, layer in enumerate(layers):
        blocks = by_layer.get(f"layer{index}", {})
        keys, values = _blocks(blocks, "keys"), _blocks(blocks, "values")
        first = keys[0][1]
        slot = (first.shape[1], cache.layout.capacity, first.shape[3])
        _make_buffers(cache, layer, slot, first.new_empty(0).to(cache.device))
        _join(cache, keys, layer.keys)
        _join(cache, values, layer.values)


def _blocks(blocks: Mapping[str, torch.Tensor], kind: str) -> list[tuple[int, torch.Tensor]]:
    """The blocks of `kind` ('keys' or 'values'), in slot order."""
    pieces = sorted(
        (int(name.rsplit(".", 1)[1]), tensor)
        for name, tensor in blocks.items()
        if name.rsplit(".", 1)[0] == kind
    )
    if not pieces:
        raise ValueError(f"a saved cache layer has no {kind}; the state is incomplete")
    return pieces


def _join(cache: SinkCache, pieces: list[tuple[int, torch.Tensor]], buffer: torch.Tensor) -> None:
    """The blocks copied into `buffer`, each into its slots."""
    filled = 0
    for block, tensor in pieces:
        start = block * LEGACY_BLOCK_SLOTS
        buffer[:, :, start : start + tensor.shape[2]].copy_(tensor)
        filled += tensor.shape[2]
    if filled != cache.layout.capacity:
        raise ValueError("a saved cache layer misses slots; the state is incomplete")
