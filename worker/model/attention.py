"""The attention our models run, registered in transformers under one name.

It is two matmuls and a softmax per row and kv head: a kv head's query heads go through its
keys together, without copying the keys per head, and a row's result depends neither on the
other rows nor on the thread count (see batch_invariance.py; SDPA's CPU kernel splits the work
of a few queries by the thread count). On a CPU with our kernels, a forward of several queries
(a prefill chunk) goes through prefill_kernel.py, which gives the same bits on any thread
count; without them, long chunks go through SDPA, whose result for them does not either.

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
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from worker.model import decode_kernel, prefill_kernel
from worker.model.kv_pool import KVPool
from worker.model.positions import PositionScheme

ATTENTION = "streamsink"  # the name it is registered under in transformers
# Without our kernels, a prefill of at least this many queries goes through SDPA: its CPU kernel
# splits such work by blocks of queries, the same on any thread count (measured down to 4
# queries, float32 and bfloat16; it splits fewer otherwise, so shorter ones are ours).
FLASH_QUERIES = 32


@dataclass(frozen=True)
class Run:
    """Rows first_row.. of a batch whose caches hold adjacent slots first_slot.. of one chunk
    of `pool`, and attend over the first `span` slots of their capacity (see
    batch_cache.attended)."""

    pool: KVPool
    first_row: int
    first_slot: int
    count: int
    span: int


@dataclass(frozen=True)
class DecodeFrames:
    """What a batched decode step's attention needs beyond the model's own arguments. A batched
    step's caches are order-free (rotary: see decoder.decode_step), so a turning is a cos and
    sin or none."""

    schemes: Sequence[PositionScheme]  # per layer
    turnings: Sequence[object]  # per layer: its scheme's turning of each row's shift
    head_slots: torch.Tensor  # [rows, slots], bool: the slots of each row's head
    runs: Sequence[Run]  # every row once, in row order: where its keys and values lie


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
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    frames = _frames.get()
    if frames is not None and query.shape[2] == 1:
        if decode_kernel.takes(key, value):  # the first run's, as the cache stores them
            step = _kernel_step(
                module.layer_idx, frames, query, scale, key.shape[1], attention_mask
            )
            return step, None
        return _decode_step(module.layer_idx, frames, query * scale, attention_mask), None
    if prefill_kernel.takes(query, key, value, attention_mask):
        return prefill_kernel.attend(query, key, value, attention_mask, scale), None
    query = query * scale  # the small side
    if query.shape[2] >= FLASH_QUERIES:
        return _flash(query, key, value, attention_mask), None
    return _attend(query, key, value, attention_mask), None


def _flash(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA (its CPU flash kernel keeps the scores of a block of queries in the CPU's cache)."""
    mask = None if mask is None else mask[..., : key.shape[2]]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=1.0, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    frames: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax(query · keys + mask) · values, per row and kv head: [rows, queries, heads,
    dims]. With `frames` (a decode step's: the query turned into the stream's frame, and the
    slots of each row's head), each slot takes the score of its frame."""
    rows, heads, length, dims = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if frames is None:
        grouped = query.reshape(rows, kv_heads, groups * length, dims)
        scores = torch.matmul(grouped, key.mT).view(rows, kv_heads, groups, length, keys)
        scores = scores[:, :, :, 0] if length == 1 else scores
    else:
        scores = _frame_scores(query, *frames, key)
    if mask is not None:
        mask = mask[..., :keys]
        scores.add_(mask if length == 1 else mask[:, :, None])
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probabilities.reshape(rows, kv_heads, groups * length, keys), value)
    return out.view(rows, heads, length, dims).transpose(1, 2)


def _frame_scores(
    query: torch.Tensor, turned: torch.Tensor, head_slots: torch.Tensor, key: torch.Tensor
) -> torch.Tensor:
    """A decode step's scores [rows, kv heads, groups, keys]: each slot of a row's head
    (`head_slots` [rows, slots]) against its query as made, every other slot against it
    `turned` by the row's shift."""
    rows, heads, _, dims = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    both = torch.cat((query, turned), dim=2)  # [rows, heads, 2 frames, dims]
    scores = torch.matmul(both.reshape(rows, kv_heads, heads // kv_heads * 2, dims), key.mT)
    scores = scores.view(rows, kv_heads, heads // kv_heads, 2, keys)
    head = head_slots[:, None, None, :keys]
    return torch.where(head, scores[:, :, :, 0], scores[:, :, :, 1])


def _run_views(layer: int, run: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's keys and values, read in place from its pool, over the slots it attends."""
    keys = run.pool.keys(layer, run.first_slot, run.count)[:, :, : run.span]
    return keys, run.pool.values(layer, run.first_slot, run.count)[:, :, : run.span]


def _decode_step(
    layer: int, frames: DecodeFrames, query: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """A batched decode step's attention through torch's matmuls, run by run; every row's
    (scaled) query turned once for all runs."""
    turned = frames.schemes[layer].turn(query, frames.turnings[layer])
    outs = []
    for run in frames.runs:
        rows = slice(run.first_row, run.first_row + run.count)
        run_mask = None if mask is None else mask[rows]
        run_frames = (turned[rows], frames.head_slots[rows])
        outs.append(_attend(query[rows], *_run_views(layer, run), run_mask, run_frames))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _kernel_step(
    layer: int,
    frames: DecodeFrames,
    query: torch.Tensor,
    scale: float,
    kv_heads: int,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The same through decode_kernel.py, in a few calls a layer: every row's query scaled
    and turned in one, then per run its scores (the mask added), softmax and values."""
    queries = decode_kernel.queries(query, scale, frames.turnings[layer], kv_heads)
    rows, heads, _, dims = query.shape
    whole = len(frames.runs) == 1  # one run of every row: nothing to slice
    outs = []
    for run in frames.runs:
        keys, values = _run_views(layer, run)
        if whole:
            run_queries, head, run_mask = queries, frames.head_slots, mask
        else:
            at = slice(run.first_row, run.first_row + run.count)
            run_queries, head = queries[at], frames.head_slots[at]
            run_mask = None if mask is None else mask[at]
        scores = decode_kernel.scores(run_queries, keys, head, run_mask)
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32)
        outs.append(decode_kernel.mix(probabilities, values))
    out = outs[0] if whole else torch.cat(outs)
    return out.to(query.dtype).view(rows, 1, heads, dims)


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)
