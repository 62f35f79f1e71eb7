"""The attention our models run, registered in transformers under one name.

It is two matmuls and a softmax per row and kv head: a kv head's query heads go through its
keys together, without copying the keys per head, and a row's result depends neither on the
other rows nor on the thread count (see batch_invariance.py; SDPA's CPU kernel splits its work
by the thread count).

In a batched decode step over sink caches (batch_cache.py) the keys come as stored, each at
its position in the stream (see positions.py), so that no step turns a whole cache. Each row's
query then goes in twice: as the model made it, at its in-cache position, for the head's keys
(whose stream and cache positions are one), and turned by the row's shift into the stream's
frame for the window's keys. Both score rows come out of one matmul, and each slot takes the
one of its frame. The step says so through `decoding`; any other forward sees plain attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from worker.model.positions import PositionScheme

ATTENTION = "streamsink"  # the name it is registered under in transformers


@dataclass(frozen=True)
class DecodeFrames:
    """What a batched decode step's attention needs beyond the model's own arguments."""

    schemes: Sequence[PositionScheme]  # per layer
    turnings: Sequence[object]  # per layer: its scheme's turning of each row's shift
    head_slots: torch.Tensor  # [rows, 1, 1, slots], bool: the slots of each row's head


_frames: ContextVar[DecodeFrames | None] = ContextVar("streamsink_decode_frames", default=None)


@contextmanager
def decoding(frames: DecodeFrames) -> Iterator[None]:
    """Within: one-token queries are a batched decode step's, over keys as stored."""
    token = _frames.set(frames)
    try:
        yield
    finally:
        _frames.reset(token)


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface.

    query [rows, heads, queries, dims]; key and value [rows, kv heads, keys, dims]; the mask
    (eager_mask's: it adds to the scores) [rows or 1, 1, queries, keys or more]. Returns
    [rows, queries, heads, dims], as every attention function does.
    """
    rows, heads, length, dims = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dims**-0.5 if scaling is None else scaling
    frames = _frames.get()
    if frames is not None and length == 1:
        layer = module.layer_idx
        turned = frames.schemes[layer].turn(query, frames.turnings[layer])
        both = torch.cat((query, turned), dim=2)  # [rows, heads, 2 frames, dims]
        scores = torch.matmul(both.reshape(rows, kv_heads, groups * 2, dims), key.mT) * scale
        scores = scores.view(rows, kv_heads, groups, 2, keys)
        scores = torch.where(
            frames.head_slots[:, :, :, :keys], scores[:, :, :, 0], scores[:, :, :, 1]
        )
    else:
        grouped = query.reshape(rows, kv_heads, groups * length, dims)
        scores = (torch.matmul(grouped, key.mT) * scale).view(rows, kv_heads, groups, length, keys)
        if length == 1:
            scores = scores[:, :, :, 0]
    if attention_mask is not None:
        mask = attention_mask[..., :keys]
        scores = scores + (mask if length == 1 else mask[:, :, None])
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probabilities.reshape(rows, kv_heads, groups * length, keys), value)
    return out.view(rows, heads, length, dims).transpose(1, 2), None


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)
