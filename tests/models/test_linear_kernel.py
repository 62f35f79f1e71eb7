"""The linear layers' kernel (linear_kernel.py): torch's linear to fp32 rounding, and a row's
bits whatever rows and threads share the call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.float_order import fused_multiply_add
from tests.models.tiny_models import VOCAB, tiny_model
from worker.model import cpu_kernels, linear_kernel
from worker.model.batch_invariance import PackedLinear

VECTORS = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AVX2"))
pytestmark = pytest.mark.skipif(not VECTORS, reason="the kernels are for CPUs with AVX2 or AVX-512")


@pytest.fixture(autouse=True, scope="module")
def _loaded() -> None:
    """The kernels loaded (test_decode_kernel.py fails where they cannot be built)."""
    if not cpu_kernels.status().ready:
        pytest.skip(f"no CPU kernels: {cpu_kernels.status().detail}")


def _case(rows: int, features: int, outputs: int, seed: int, dtype=torch.float32):
    if dtype == torch.bfloat16 and not torch.ops.streamsink.has_bfloat16_dot():
        pytest.skip("bfloat16 needs a CPU with AVX512-BF16")
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, features, generator=generator).to(dtype)
    weight = torch.randn(outputs, features, generator=generator).to(dtype)
    bias = torch.randn(outputs, generator=generator).to(dtype)
    return inputs, weight, bias


# Outputs around the panels of 48, rows around the tiles of 8, features from one on.
@pytest.mark.parametrize("outputs", [1, 47, 48, 49, 200])
@pytest.mark.parametrize("features", [1, 33, 576])
@pytest.mark.parametrize("rows", [1, 7, 9, 17])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)]
)  # bfloat16: the sum of the same values in float32, rounded once to bfloat16
def test_it_matches_torchs_linear(
    rows: int, features: int, outputs: int, biased: bool, dtype: torch.dtype, tolerance: float
) -> None:
    inputs, weight, bias = _case(rows, features, outputs, rows * features + outputs, dtype)
    bias = bias if biased else None
    ours = linear_kernel.linear(inputs, linear_kernel.pack(weight), outputs, bias)
    assert ours.dtype == dtype
    expected = F.linear(inputs.double(), weight.double(), None if bias is None else bias.double())
    torch.testing.assert_close(
        ours.double(), expected, rtol=tolerance, atol=1e-5 * features**0.5, check_dtype=False
    )


def test_it_keeps_the_leading_dimensions() -> None:
    inputs, weight, bias = _case(6, 20, 30, 0)
    ours = linear_kernel.linear(inputs.view(2, 3, 20), linear_kernel.pack(weight), 30, bias)
    assert ours.shape == (2, 3, 30)
    assert torch.equal(
        ours.view(6, 30), linear_kernel.linear(inputs, linear_kernel.pack(weight), 30, bias)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_thread_count(
    dtype: torch.dtype,
) -> None:
    inputs, weight, bias = _case(19, 100, 150, 1, dtype)
    panels = linear_kernel.pack(weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [linear_kernel.linear(inputs[i : i + 1], panels, 150, bias) for i in range(19)]
        torch.set_num_threads(3)
        for count in (2, 5, 8, 9, 19):
            together = linear_kernel.linear(inputs[:count], panels, 150, bias)
            for row in range(count):
                assert torch.equal(together[row], alone[row][0]), (count, row)
    finally:
        torch.set_num_threads(threads)


def test_what_it_cannot_take_is_a_clear_error() -> None:
    inputs, weight, bias = _case(2, 16, 50, 2)
    panels = linear_kernel.pack(weight)
    with pytest.raises(RuntimeError, match="input must be a float32 or bfloat16"):
        linear_kernel.linear(inputs.double(), panels, 50, bias)
    with pytest.raises(RuntimeError, match="panels must be"):
        linear_kernel.linear(inputs, linear_kernel.pack(weight.bfloat16()), 50, None)
    with pytest.raises(RuntimeError, match="panels must be"):
        linear_kernel.linear(inputs[:, :8], panels, 50, bias)
    with pytest.raises(RuntimeError, match="panels must be"):
        linear_kernel.linear(inputs, panels, 200, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        linear_kernel.linear(inputs, panels, 50, bias[:10])


@torch.inference_mode()
def test_a_model_runs_every_linear_layer_through_it_and_matches_onednn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model's layers are packed for the kernel; packed for oneDNN instead (the path of a
    CPU without the kernels), its logits agree."""
    model = tiny_model("llama")
    layers = [module for module in model.modules() if isinstance(module, PackedLinear)]
    assert layers and all(layer.ours for layer in layers)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    calls = []
    kernel = linear_kernel.linear
    monkeypatch.setattr(linear_kernel, "linear", lambda *args: calls.append(1) or kernel(*args))
    ours = model(input_ids=ids).logits
    assert len(calls) == len(layers)
    monkeypatch.setattr(linear_kernel, "takes", lambda weight: False)
    for layer in layers:
        layer.pack()
    assert not any(layer.ours for layer in layers)
    onednn = model(input_ids=ids).logits
    assert len(calls) == len(layers)  # the kernel was not called again
    torch.testing.assert_close(ours, onednn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("rows", "features", "outputs"), [(1, 576, 49), (13, 100, 150)])
def test_every_output_sums_in_feature_order_bit_for_bit(
    rows: int, features: int, outputs: int
) -> None:
    """One fused multiply-add per input feature, feature 0 first, then the bias: the order
    the kernel documents, the same with AVX-512 and with AVX2, so the two give equal bits."""
    inputs, weight, bias = _case(rows, features, outputs, seed=features)
    sums = torch.zeros(rows, outputs)
    for k in range(features):
        sums = fused_multiply_add(inputs[:, k : k + 1], weight[:, k], sums)
    ours = linear_kernel.linear(inputs, linear_kernel.pack(weight), outputs, bias)
    assert torch.equal(ours, sums + bias)
