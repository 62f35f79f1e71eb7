"""RMSNorm as a CPU kernel of our own (kernels/rms_norm.cpp, built by cpu_kernels.py).

transformers' RMSNorm is seven small ops (widen, square, mean, add, rsqrt, two products), and
a decode step runs two per layer and one more at the end: 61 in SmolLM2. On the CPU each op
costs more to dispatch than its arithmetic does: a norm of one row took 60 us on a 2-core
EPYC, the kernel's call 20 us (most of it the call from Python), and a one-stream step about
4 ms less. The kernel does a row in one call, in one fixed order, so a row's bits still follow
the row alone. `add_and_norm` also takes the residual add before a norm into the call, for a
decode step's forward (decode_forward.py): one call where there were two.

It takes the norms whose formula it knows, by class (`FORMULAS`), and only on the CPU in
float32 or bfloat16; any other norm, device or dtype runs the model's own forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from worker.model import cpu_kernels

DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Formula:
    """How a norm class scales its normed input: by weight + `offset`, the normed input
    rounded to the input's dtype first where `round_between` (else the product rounded once);
    its epsilon is the attribute `eps_attribute`."""

    offset: float
    round_between: bool
    eps_attribute: str


_LLAMA = Formula(0.0, True, "variance_epsilon")  # weight * normed.to(dtype)
_GEMMA = Formula(1.0, False, "eps")  # (normed * (1 + weight)).to(dtype)
FORMULAS = {
    "LlamaRMSNorm": _LLAMA,
    "MistralRMSNorm": _LLAMA,
    "Qwen2RMSNorm": _LLAMA,
    "Qwen3RMSNorm": _LLAMA,
    "Phi3RMSNorm": _LLAMA,
    "GemmaRMSNorm": _GEMMA,
    "Gemma2RMSNorm": _GEMMA,
    "Gemma3RMSNorm": _GEMMA,
    "GptOssRMSNorm": Formula(0.0, False, "variance_epsilon"),  # (weight * normed).to(dtype)
}


class FusedRMSNorm(nn.Module):
    """Mixed in front of a norm class of FORMULAS (see `fuse`): its forward through the
    kernel where it takes the input (a model moved since may not), else the class's own."""

    formula: Formula
    stock: type[nn.Module]  # the class it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not takes(x, self.weight):
            return super().forward(x)
        return torch.ops.streamsink.rms_norm(x, *self.kernel_arguments())

    def kernel_arguments(self) -> tuple[torch.Tensor, float, float, bool]:
        """What the kernel takes after the input: the weight, epsilon and the formula's
        offset and rounding."""
        formula = self.formula
        eps = getattr(self, formula.eps_attribute)
        return self.weight, eps, formula.offset, formula.round_between


def add_and_norm(
    norm: nn.Module, x: torch.Tensor, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x + residual, and that sum through `norm`: one kernel call where the kernel takes the
    norm, with the bits of the add and the norm's forward; else those two."""
    if isinstance(norm, FusedRMSNorm) and takes(x, norm.weight) and residual.dtype == x.dtype:
        return torch.ops.streamsink.add_rms_norm(x, residual, *norm.kernel_arguments())
    total = x + residual
    return total, norm(total)


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel computes this norm: CPU tensors of one of DTYPES (the kernels are
    loaded: a norm is fused only then)."""
    return x.dtype == weight.dtype and x.dtype in DTYPES and x.is_cpu and weight.is_cpu


def fuse(module: nn.Module) -> None:
    """Give `module` the kernel's forward if its class is a norm of FORMULAS, its weight on
    the CPU, and the kernels loaded (idempotent)."""
    formula = FORMULAS.get(type(module).__name__)
    if (
        formula is not None
        and not isinstance(module, FusedRMSNorm)
        and module.weight.is_cpu
        and cpu_kernels.status().ready
    ):
        module.__class__ = _fused_class(type(module), formula)


def unfuse(module: nn.Module) -> None:
    """Give `module` its class's own forward back."""
    if isinstance(module, FusedRMSNorm):
        module.__class__ = module.stock


@functools.cache
def _fused_class(stock: type[nn.Module], formula: Formula) -> type[nn.Module]:
    return type(
        f"Fused{stock.__name__}", (FusedRMSNorm, stock), {"formula": formula, "stock": stock}
    )
