"""The norms' kernel (norm_kernel.py): each formula it takes against the model's own forward,
and every row's bits in the order the kernel documents, whatever rows share the call."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.models.tiny_models import tiny_configs, tiny_model
from worker.model import cpu_kernels, norm_kernel
from worker.model.batch_invariance import stock_kernels


@pytest.fixture(autouse=True, scope="module")
def _loaded() -> None:
    """The kernels loaded: they load on a CPU with AVX2 or AVX-512 (test_decode_kernel.py
    fails where they cannot be built)."""
    if not cpu_kernels.status().ready:
        pytest.skip(f"no CPU kernels: {cpu_kernels.status().detail}")


def _fused_norms(name: str) -> list[norm_kernel.FusedRMSNorm]:
    return [m for m in tiny_model(name).modules() if isinstance(m, norm_kernel.FusedRMSNorm)]


def _randomized(norm: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The norm in `dtype` with weights far from the ones and zeros it starts with."""
    norm = norm.to(dtype)
    with torch.no_grad():
        norm.weight.copy_(
            torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1))
        )
    return norm


def test_every_formula_is_a_norm_of_a_tested_architecture() -> None:
    fused = {norm.stock.__name__ for name in tiny_configs() for norm in _fused_norms(name)}
    assert fused == set(norm_kernel.FORMULAS)


@pytest.mark.parametrize("name", sorted(tiny_configs()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_each_norm_computes_what_its_own_forward_does(name: str, dtype: torch.dtype) -> None:
    for norm in _fused_norms(name):
        norm = _randomized(norm, dtype)
        x = (3 * torch.randn(2, 5, norm.weight.shape[0])).to(dtype)
        fused = norm(x)
        norm_kernel.unfuse(norm)
        stock = norm(x)
        assert not isinstance(norm, norm_kernel.FusedRMSNorm)
        assert fused.dtype == stock.dtype == dtype and fused.shape == stock.shape
        if dtype == torch.float32:  # the sum of squares runs in another order
            torch.testing.assert_close(fused, stock, rtol=2e-6, atol=2e-6)
        else:  # the same roundings: only a value at a rounding's boundary may differ
            assert (fused != stock).float().mean() < 0.01
            torch.testing.assert_close(fused, stock)


def _in_order(x: torch.Tensor, weight: torch.Tensor, formula: norm_kernel.Formula, eps: float):
    """The kernel's documented order, row by row: the squares summed in double, feature 0
    first; the mean rounded to float32; then float32 operations, one rounding each."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for index, row in enumerate(rows.float()):
        squares = 0.0
        for value in row.tolist():  # Python floats are doubles; a float32 square is exact
            squares += value * value
        mean = np.float32(squares / len(row))
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(mean + np.float32(eps))))
        normed = row * torch.tensor(scale)
        if formula.round_between:
            normed = normed.to(x.dtype).float()
        out[index] = (normed * (weight.float() + formula.offset)).to(x.dtype)
    return out.view(x.shape)


@pytest.mark.parametrize("formula", sorted(set(norm_kernel.FORMULAS.values()), key=repr))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_follows_the_documented_order_bit_for_bit(
    formula: norm_kernel.Formula, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(2)
    x = (4 * torch.randn(3, 11, 67, generator=generator)).to(dtype)
    weight = torch.randn(67, generator=generator).to(dtype)
    out = torch.ops.streamsink.rms_norm(x, weight, 1e-5, formula.offset, formula.round_between)
    assert torch.equal(out, _in_order(x, weight, formula, 1e-5))
    alone = torch.ops.streamsink.rms_norm(
        x[1, 4], weight, 1e-5, formula.offset, formula.round_between
    )
    assert torch.equal(alone, out[1, 4])


def test_the_stock_kernels_give_the_norms_their_own_forward_back() -> None:
    model = tiny_model("llama")
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and all(isinstance(m, norm_kernel.FusedRMSNorm) for m in norms)
    with stock_kernels(model):
        assert not any(isinstance(m, norm_kernel.FusedRMSNorm) for m in norms)
    assert all(isinstance(m, norm_kernel.FusedRMSNorm) for m in norms)


@pytest.mark.parametrize("name", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_the_residual_add_and_the_norm_after_it_in_one_call(name: str, dtype: torch.dtype) -> None:
    """The bits of torch's add, then of the norm's own (fused) forward; a norm the kernel does
    not take gets those two as they are."""
    norm = _randomized(_fused_norms(name)[0], dtype)
    generator = torch.Generator().manual_seed(3)
    x, residual = (3 * torch.randn(2, 4, 1, norm.weight.shape[0], generator=generator)).to(dtype)
    total, normed = norm_kernel.add_and_norm(norm, x, residual)
    assert torch.equal(total, x + residual)
    assert torch.equal(normed, norm(x + residual))
    norm_kernel.unfuse(norm)
    total, normed = norm_kernel.add_and_norm(norm, x, residual)
    assert torch.equal(total, x + residual) and torch.equal(normed, norm(x + residual))
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.streamsink.add_rms_norm(x, residual[:1], norm.weight, 1e-6, 0.0, True)
