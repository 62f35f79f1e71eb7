"""The unit a store saves and restores: one stream's complete resumable state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BlockRef:
    """A tensor by the content-addressed block that holds its bytes in a store.

    A checkpoint names the tensors that did not change since the stream's last committed state
    this way, so they are neither copied nor hashed again.
    """

    dtype: str  # a name of codec.DTYPE_SIZES
    shape: tuple[int, ...]
    block: str
    nbytes: int


# eq=False: field-wise == would compare tensors element-wise and fail; compare what you need.
@dataclass(frozen=True, eq=False)
class StreamState:
    """Everything needed to resume one stream exactly.

    `stored` names tensors by the blocks that hold them: to save, the tensors not carried in
    `tensors`, whose blocks the store already holds for this stream; read back, the block of
    every tensor, so that the next save of the stream can name the unchanged ones.
    """

    stream_id: str
    fingerprint: str  # model fingerprint (opaque hex string)
    tensors: Mapping[str, torch.Tensor]  # named CPU tensors, any shape and supported dtype
    meta: Mapping[str, Any]  # plain data: None, bool, int, float, str, bytes, list, str-keyed dict
    # What the writer ran, by name, as plain data (the worker decides which: dtype, rope, cache
    # size, layer types); compared one by one on load, see Expected. States saved before it
    # existed have none.
    written_with: Mapping[str, Any] = field(default_factory=dict)
    stored: Mapping[str, BlockRef] = field(default_factory=dict)


@dataclass(frozen=True)
class Expected:
    """What a reader runs, which a state must have been written with to be loaded.

    cache_store compares the values without knowing what they mean: each name in
    `written_with` that the state also carries must be equal, so a refusal names the field and
    both values; a name the state lacks (a state saved before that field was recorded) is left
    to the fingerprint, which the state must match too. `fix` says how to run so that it loads.
    """

    fingerprint: str
    written_with: Mapping[str, Any] = field(default_factory=dict)
    fix: str = "run with the model and settings that wrote it"
