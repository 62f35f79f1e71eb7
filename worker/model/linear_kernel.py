"""Linear layers as a CPU kernel of our own (kernels/linear.cpp, built by cpu_kernels.py).

A decode step of a few rows reads every weight once for a few products each: bound by memory,
and oneDNN reads the weights of one or two rows at about half the memory's speed on this kind
of CPU. The kernel reads them at close to its speed, and from about 16 rows on (a batched
decode step, a prefill chunk) runs the FMA units near their peak. Its weight is packed once
into panels of 48 outputs (zero past the last output), and each output sums its products in
one order, whatever the rows beside it or the thread count. In bfloat16 (on a CPU with
AVX512-BF16's dot product, else oneDNN's) the panels hold pairs of features, [panels, in
features / 2, 48, 2], each pair's products exact in float32; every sum is in float32, and the
outputs are rounded to bfloat16 once, at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.model import cpu_kernels

PANEL = 48  # the outputs of one panel, as kernels/linear.cpp reads them
DTYPES = (torch.float32, torch.bfloat16)  # of the weights, inputs and outputs; sums in float32


def takes(weight: torch.Tensor) -> bool:
    """Whether the kernel computes a linear layer of this weight."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in DTYPES
        and cpu_kernels.status().ready
        and (weight.dtype != torch.bfloat16 or torch.ops.streamsink.has_bfloat16_dot())
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [outputs, in features] as the kernel reads it."""
    outputs, features = weight.shape
    pairs = weight.dtype == torch.bfloat16
    padded = F.pad(weight, (0, features % 2 if pairs else 0, 0, -outputs % PANEL))
    if pairs:
        panels = padded.view(-1, PANEL, padded.shape[1] // 2, 2).transpose(1, 2)
    else:
        panels = padded.view(-1, PANEL, features).transpose(1, 2)
    return panels.contiguous()


def linear(
    inputs: torch.Tensor, panels: torch.Tensor, outputs: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """inputs [..., in features] @ weight.T (+ bias), the weight as `pack` made it."""
    return torch.ops.streamsink.linear(inputs, panels, outputs, bias)
