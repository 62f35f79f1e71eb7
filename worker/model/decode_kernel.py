"""A batched decode step's two attention matmuls as CPU kernels of our own
(kernels/decode_attention.cpp, built by cpu_kernels.py).

A decode step's attention reads every row's whole cache for one query per head: at 16 streams
of 1024 tokens, 720 MB a step in fp32, and it took two thirds of the step. MKL's batched GEMM
reads those keys and values at a third of the memory's speed on CPUs it does not tune for
(AMD); the kernels read them at close to its speed, each (row, kv head) whole on one thread.
Where they cannot be had (see cpu_kernels.py), or for another device or dtype, attention runs
through torch's matmuls.
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


def scores(queries: torch.Tensor, keys: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """float32 scores [rows, kv heads, groups, span] of queries [rows, kv heads, 2 frames,
    groups, dims] against keys [rows, kv heads, span, dims] (of the queries' dtype): a slot
    where head [rows, span] is set takes the query of frame 0, any other frame 1's."""
    return torch.ops.streamsink.decode_scores(queries, keys, head)


def mix(probabilities: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 outputs [rows, kv heads, groups, dims]: float32 probabilities [rows, kv heads,
    groups, span] times values [rows, kv heads, span, dims]."""
    return torch.ops.streamsink.decode_mix(probabilities, values)
