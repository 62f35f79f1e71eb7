"""What the kernels' order-of-sums tests share: one float32 operation rounded as the kernels
round it."""

from __future__ import annotations

import torch


def fused_multiply_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c in float32, rounded once (a float32 product is exact in float64)."""
    return (a.double() * b.double() + c.double()).float()
