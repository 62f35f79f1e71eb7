"""A prefill chunk's attention as a CPU kernel of our own (kernels/prefill_attention.cpp, built
by cpu_kernels.py).

A prefill's attention is a matmul-shaped job, unlike a decode step's: 256 queries against up
to 1024 keys per chunk. torch's SDPA kernel ran it at 115 to 140 GFLOP/s on a 2-core machine
whose linear layers reach 210, and computed the masked half of the chunk's own block: a quarter
of a 1024-token prefill. The kernel keeps a kv head's keys packed for the matmul, skips the
keys the mask hides from a block of queries, and sums in one order whatever the threads, so a
stream's prefill has the same bits on any worker (see the kernel's header for the order).
Where it cannot be had (see cpu_kernels.py), or on another device, SDPA (or torch's matmuls,
for a few queries) runs it.
"""

from __future__ import annotations

import torch

from worker.model import decode_kernel


def takes(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> bool:
    """Whether the kernel computes this forward's attention: several queries of the keys'
    dtype, keys and values it reads (decode_kernel.takes), a mask [rows or 1, 1, queries, keys]
    of one of its dtypes, or none."""
    return (
        query.shape[2] > 1
        and query.dtype == keys.dtype
        and (
            mask is None
            or (mask.dtype in decode_kernel.DTYPES and mask.dim() == 4 and mask.shape[1] == 1)
        )
        and decode_kernel.takes(keys, values)
    )


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """softmax(query · keys * scale + mask) · values in float32: query [rows, heads, queries,
    dims], keys and values [rows, kv heads, span, dims] of its dtype (`takes` them), mask
    [rows or 1, 1, queries, span or more] as attention's masks add, or none ->
    [rows, queries, heads, dims] in the query's dtype."""
    out = torch.ops.streamsink.prefill_attention(query, keys, values, mask, scale)
    return out.to(query.dtype)
