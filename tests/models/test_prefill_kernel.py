"""The prefill attention kernel (prefill_kernel.py): softmax attention to fp32 rounding, summed
in the order it documents, and a row's bits whatever the threads, the other rows and the keys
its mask hides."""

from __future__ import annotations

import pytest
import torch

from tests.models.float_order import fused_multiply_add
from worker.model import cpu_kernels, prefill_kernel

VECTORS = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AVX2"))
pytestmark = pytest.mark.skipif(not VECTORS, reason="the kernels are for CPUs with AVX2 or AVX-512")
ROWS = 2
LOWEST = torch.finfo(torch.float32).min  # what transformers' masks write for a hidden key


@pytest.fixture(autouse=True, scope="module")
def _loaded() -> None:
    cpu_kernels.status()


def _case(dims: int, heads: int, kv_heads: int, length: int, span: int, dtype=torch.float32):
    """A query as the model hands it over ([rows, heads, queries, dims], a transposed view),
    and keys and values read in place from a cache of more slots."""
    generator = torch.Generator().manual_seed(dims * heads + length + span)
    query = torch.randn(ROWS, length, heads, dims, generator=generator).to(dtype).transpose(1, 2)
    cache = torch.randn(2, ROWS, kv_heads, span + 9, dims, generator=generator).to(dtype)
    return query, cache[0, :, :, :span], cache[1, :, :, :span]


def _causal(length: int, span: int, hidden: float = LOWEST, rows: int = 1) -> torch.Tensor:
    """[rows, 1, length, span + 3]: query i, the (span - length + i)-th token, sees the keys up
    to itself. The slots past the span are NaN: the kernel must not read them."""
    mask = torch.zeros(rows, 1, length, span + 3)
    seen = torch.arange(span) <= torch.arange(span - length, span)[:, None]
    mask[..., :span] = torch.where(seen, 0.0, hidden)
    mask[..., span:] = float("nan")
    return mask


def _softmax_attention(query, keys, values, mask, scale):
    """In float64, from the same values: [rows, queries, heads, dims]."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = (t.double().repeat_interleave(groups, dim=1) for t in (keys, values))
    scores = query.double() @ keys.mT * scale
    if mask is not None:
        scores = scores + mask[..., : keys.shape[2]].double()
    return (torch.softmax(scores, dim=-1) @ values).transpose(1, 2)


# Head dims from one partial chunk of 16 lanes to the most; GQA and plain heads; spans and
# chunks around the kernel's blocks of 16 keys (tiles of up to 4) and tasks of 16 queries.
@pytest.mark.parametrize("dims", [8, 64, 80, 256])
@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (9, 3), (4, 1)])
@pytest.mark.parametrize(("length", "span"), [(2, 5), (17, 64), (40, 130)])
@pytest.mark.parametrize("hidden", [LOWEST, float("-inf"), None])
def test_it_is_softmax_attention(dims, heads, kv_heads, length, span, hidden) -> None:
    query, keys, values = _case(dims, heads, kv_heads, length, span)
    mask = None if hidden is None else _causal(length, span, hidden)
    out = prefill_kernel.attend(query, keys, values, mask, dims**-0.5)
    expected = _softmax_attention(query, keys, values, mask, dims**-0.5)
    assert out.shape == (ROWS, length, heads, dims) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dims", [24, 64])
def test_bfloat16_is_softmax_attention_of_the_widened_values(dims: int) -> None:
    query, keys, values = _case(dims, 9, 3, 20, 100, torch.bfloat16)
    mask = _causal(20, 100).to(torch.bfloat16)
    out = prefill_kernel.attend(query, keys, values, mask, dims**-0.5)
    expected = _softmax_attention(query, keys, values, mask, dims**-0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=1.6e-2, atol=4e-3)


def _exp_nonpositive(x: torch.Tensor) -> torch.Tensor:
    """The kernel's e^x, operation by operation in float32."""
    kept = torch.clamp(x, min=-87.0)
    n = torch.round(kept * torch.tensor(1.44269504088896341, dtype=torch.float32))
    r = fused_multiply_add(n, torch.tensor(-0.693359375), kept)
    r = fused_multiply_add(n, torch.tensor(2.12194440e-4), r)
    p = torch.full_like(r, 1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = fused_multiply_add(p, r, torch.tensor(c))
    e = fused_multiply_add(p, r * r, r) + 1
    return torch.where(x >= -87.0, e * torch.pow(2.0, n), 0.0)


def _attention_in_order(query, keys, values, mask, scale):
    """The sums the kernel documents: each score over the dims in order, one fused
    multiply-add each, plus the mask; e^(score - the row's greatest); the row's sum by lanes of
    keys l, l + 16, ..., then the lanes in order; each output over the keys in order, times
    1 / sum. [rows, queries, heads, dims] in float32."""
    groups = query.shape[1] // keys.shape[1]
    query = query.float() * scale
    keys, values = (t.float().repeat_interleave(groups, dim=1) for t in (keys, values))
    span = keys.shape[2]
    scores = torch.zeros(*query.shape[:3], span)
    for d in range(query.shape[-1]):
        scores = fused_multiply_add(query[..., d, None], keys[..., None, :, d], scores)
    scores = scores + mask[..., :span]
    probabilities = _exp_nonpositive(scores - scores.amax(dim=-1, keepdim=True))
    lanes = torch.zeros(*scores.shape[:3], 16)
    for key in range(span):
        lanes[..., key % 16] += probabilities[..., key]
    total = torch.zeros(scores.shape[:3])
    for lane in range(16):
        total = total + lanes[..., lane]
    out = torch.zeros(query.shape)
    for key in range(span):
        out = fused_multiply_add(probabilities[..., key, None], values[:, :, None, key], out)
    return (out * (1 / total)[..., None]).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_sum_runs_in_the_documented_order_bit_for_bit(dtype: torch.dtype) -> None:
    """The order the kernel documents, the same with AVX-512 and with AVX2: the two give equal
    bits."""
    query, keys, values = _case(24, 4, 2, 3, 40, dtype)
    mask = _causal(3, 40)
    out = torch.ops.streamsink.prefill_attention(query, keys, values, mask, 24**-0.5)
    assert torch.equal(out, _attention_in_order(query, keys, values, mask, 24**-0.5))


def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_thread_count() -> None:
    query, keys, values = _case(64, 9, 3, 40, 130)
    mask = _causal(40, 130, rows=ROWS)
    mask[1, ..., :7] = LOWEST  # the second row's own mask
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = prefill_kernel.attend(query, keys, values, mask, 0.125)
        torch.set_num_threads(3)
        for row in range(ROWS):
            alone = slice(row, row + 1)
            inputs = (t[alone] for t in (query, keys, values, mask))
            assert torch.equal(prefill_kernel.attend(*inputs, 0.125), together[alone])
    finally:
        torch.set_num_threads(threads)


def test_keys_hidden_from_every_query_of_a_block_weigh_nothing_computed_or_skipped() -> None:
    """Keys 64..127 hidden from the first query: skipped when it is alone, computed (and given
    no weight) beside a query that sees them. A query that sees no key gets zeros."""
    query, keys, values = _case(64, 9, 3, 3, 200)
    mask = torch.zeros(1, 1, 3, 200)
    mask[:, :, 0, 64:128] = LOWEST
    mask[:, :, 2] = float("-inf")
    both = prefill_kernel.attend(query[:, :, :2], keys, values, mask[:, :, :2], 0.125)
    alone = prefill_kernel.attend(query[:, :, :1], keys, values, mask[:, :, :1], 0.125)
    assert torch.equal(both[:, :1], alone)
    blind = prefill_kernel.attend(query[:, :, 2:], keys, values, mask[:, :, 2:], 0.125)
    assert torch.equal(blind, torch.zeros_like(blind))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v, m: (q.to(torch.bfloat16), k, v, m), "query must be"),
        (lambda q, k, v, m: (q[:, :8], k, v, m), "query must be"),
        (lambda q, k, v, m: (q, k, v[:, :, :-1], m), "values must match"),
        (lambda q, k, v, m: (q, k, v, m[..., :100]), "mask must be"),
        (lambda q, k, v, m: (q, k, v, m[:, :, :5]), "mask must be"),
        (lambda q, k, v, m: (q, k, v, m.expand(1, 9, -1, -1)), "mask must be"),
        (lambda q, k, v, m: (q, k.transpose(2, 3), v, m), "keys"),
    ],
)
def test_it_refuses_inputs_it_cannot_read(change, message: str) -> None:
    query, keys, values = _case(64, 9, 3, 20, 130)
    args = change(query, keys, values, _causal(20, 130))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.streamsink.prefill_attention(*args, 0.125)


def test_attention_takes_the_kernel_only_for_what_it_reads() -> None:
    """Anything else goes through SDPA or torch's matmuls, as before the kernel."""
    query, keys, values = _case(64, 9, 3, 20, 130)
    mask = _causal(20, 130)
    assert prefill_kernel.takes(query, keys, values, mask)
    assert prefill_kernel.takes(query, keys, values, None)
    assert not prefill_kernel.takes(query[:, :, :1], keys, values, mask[:, :, :1])  # a decode
    assert not prefill_kernel.takes(query, keys, values, mask.half())
    assert not prefill_kernel.takes(query, keys, values, mask.expand(1, 9, -1, -1))
    assert not prefill_kernel.takes(query.double(), keys.double(), values.double(), mask)
