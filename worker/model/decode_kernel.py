"""A batched decode step's two attention matmuls as CPU kernels of our own
(kernels/decode_attention.cpp, built by cpu_kernels.py), and what the step does to each row
around them (kernels/decode_rows.cpp): the new query and key turned by the model's rotary,
the key and value stored, the query scaled and turned.

A decode step's attention reads every row's whole cache for one query per head: at 16 streams
of 1024 tokens, 720 MB a step in fp32, and it took two thirds of the step. MKL's batched GEMM
reads those keys and values at a third of the memory's speed on CPUs it does not tune for
(AMD); the kernels read them at close to its speed, each score and each (row, kv head)'s
outputs computed whole by one thread. Where they cannot be had (see cpu_kernels.py), or for
another device or dtype, attention runs through torch's matmuls.

Around the matmuls, a layer of a step made some sixty small torch calls of its own (the key's
turn and the slot writes, the query's scale, turn and layout, the mask), a few microseconds
each: 3 to 7 ms of a one-stream bfloat16 step of 24 to 29 ms. `store` and `queries` make them
two calls, and `scores` adds the mask, with the same bits (see decode_rows.cpp). The model's
own rotary function, sixteen more small calls a layer (about 1 ms of a one-stream step), is
`rotary`'s one.
"""

from __future__ import annotations

import torch

from worker.model import cpu_kernels

MAX_DIMS = 256  # the head dims the kernels take
DTYPES = (torch.float32, torch.bfloat16)  # the caches they read; they sum in float32


def takes(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernels can read these keys and values: of one of DTYPES, on the CPU, each
    head's slots one after another, heads of at most MAX_DIMS."""
    return (
        keys.dtype == values.dtype
        and all(
            tensor.device.type == "cpu"
            and tensor.dtype in DTYPES
            and tensor.shape[-1] <= MAX_DIMS
            and tensor.stride(-1) == 1
            and tensor.stride(-2) == tensor.shape[-1]
            for tensor in (keys, values)
        )
        and cpu_kernels.status().ready
    )


def takes_rotary(hidden: torch.Tensor, dims: int) -> bool:
    """Whether `rotary` turns the query and key of a step of these hidden states, heads of
    `dims`."""
    return (
        hidden.device.type == "cpu"
        and hidden.dtype in DTYPES
        and dims <= MAX_DIMS
        and cpu_kernels.status().ready
    )


def rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's query [rows, heads, 1, dims] and key [rows, kv heads, 1, dims] turned to their
    in-cache positions by the model's rotary embedding (cos and sin [rows, 1, dims] of their
    dtype): the bits of transformers' apply_rotary_pos_emb (each product rounded, then the
    sum), in one call."""
    return torch.ops.streamsink.decode_rotary(query, key, cos, sin)


Turning = tuple[torch.Tensor, torch.Tensor] | None  # a RotaryScheme's cos and sin, or none


def store(
    keys: torch.Tensor,
    values: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    slots: torch.Tensor,
    storing: Turning,
) -> None:
    """Write each row's new key [rows, kv heads, 1, dims] (at its in-cache position), turned by
    `storing` (float32 cos and sin [rows, ..., rotary dims]) in float32, and its new value into
    slot `slots[row]` of keys and values [rows, kv heads, capacity, dims]: what RotaryScheme's
    to_stored and two index writes do."""
    cos, sin = storing if storing is not None else (None, None)
    torch.ops.streamsink.decode_store(keys, values, new_keys, new_values, slots, cos, sin)


def queries(query: torch.Tensor, scale: float, turning: Turning, kv_heads: int) -> torch.Tensor:
    """[rows, kv heads, 2 frames, groups, dims], as `scores` takes them, from a step's query
    [rows, heads, 1, dims]: frame 0 it times `scale`, frame 1 that turned by `turning` (cos
    and sin of its dtype, [rows, ..., rotary dims]), as RotaryScheme.turn turns it."""
    cos, sin = turning if turning is not None else (None, None)
    return torch.ops.streamsink.decode_queries(query, scale, cos, sin, kv_heads)


def scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    head: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 scores [rows, kv heads, groups, span] of queries [rows, kv heads, 2 frames,
    groups, dims] against keys [rows, kv heads, span, dims] (of the queries' dtype): a slot
    where head [rows, span] is set takes the query of frame 0, any other frame 1's; plus
    `mask` [rows, ..., span or more] where given."""
    return torch.ops.streamsink.decode_scores(queries, keys, head, mask)


def mix(probabilities: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 outputs [rows, kv heads, groups, dims]: float32 probabilities [rows, kv heads,
    groups, span] times values [rows, kv heads, span, dims]."""
    return torch.ops.streamsink.decode_mix(probabilities, values)
