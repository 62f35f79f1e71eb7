"""The decode step's attention kernels (decode_kernel.py): torch's matmuls' results to fp32
rounding, and a row's bits whatever rows and threads share the call."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tests.models.float_order import fused_multiply_add
from tests.models.tiny_models import VOCAB, tiny_model
from worker.model import cpu_kernels, decode_kernel
from worker.model.batch_cache import batch_forward
from worker.model.batch_invariance import make_batch_invariant
from worker.model.decoder import forward_step
from worker.model.kv_pool import KVPool
from worker.model.positions import RotaryScheme
from worker.model.sink_cache import SinkCache

VECTORS = torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AVX2"))
pytestmark = pytest.mark.skipif(not VECTORS, reason="the kernels are for CPUs with AVX2 or AVX-512")
ROWS, KV_HEADS, SLOTS = 3, 2, 150
LONG = 530  # keys over three of the scores' tasks, the last one partial


@pytest.fixture(autouse=True, scope="module")
def _loaded() -> None:
    """The kernels loaded before any test calls their ops, whichever test runs first."""
    cpu_kernels.status()


def test_the_kernels_are_built_where_the_cpu_takes_them() -> None:
    """A failed build (no compiler, a source that does not compile) fails here, not quietly."""
    assert cpu_kernels.status().ready, cpu_kernels.status().detail


def _case(dims: int, groups: int, span: int, seed: int, dtype: torch.dtype = torch.float32):
    """Queries of both frames, keys and values read in place from a pool of more rows and
    slots (as a run of a KVPool chunk), and a head of scattered slots."""
    generator = torch.Generator().manual_seed(seed)
    slots = max(SLOTS, span + 20)
    pool = torch.randn(2, ROWS + 1, KV_HEADS, slots, dims, generator=generator).to(dtype)
    keys, values = pool[0, 1:, :, :span], pool[1, 1:, :, :span]
    queries = torch.randn(ROWS, KV_HEADS, 2, groups, dims, generator=generator).to(dtype)
    head = torch.rand(ROWS, slots, generator=generator) < 0.3
    return queries, keys, values, head


def _torch_scores(queries, keys, head):
    """In float32, from the same values (bfloat16 ones widened, as the kernels read them)."""
    queries, keys = queries.float(), keys.float()
    rows, kv_heads, _, groups, dims = queries.shape
    both = torch.matmul(queries.reshape(rows, kv_heads, 2 * groups, dims), keys.mT)
    both = both.view(rows, kv_heads, 2, groups, keys.shape[2])
    return torch.where(head[:, None, None, : keys.shape[2]], both[:, :, 0], both[:, :, 1])


# Head dims from one partial chunk of 16 lanes to the most; groups around the blocks of 4 the
# output kernel serves at once; spans around the 16 keys the score kernel sums at once.
@pytest.mark.parametrize("dims", [8, 24, 64, 80, 256])
@pytest.mark.parametrize("groups", [1, 3, 5, 9])
@pytest.mark.parametrize("span", [5, 37, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_and_outputs_match_torchs_matmuls(
    dims: int, groups: int, span: int, dtype: torch.dtype
) -> None:
    queries, keys, values, head = _case(dims, groups, span, dims * groups + span, dtype)
    scores = decode_kernel.scores(queries, keys, head)
    torch.testing.assert_close(scores, _torch_scores(queries, keys, head), rtol=1e-5, atol=1e-5)
    probabilities = torch.softmax(scores, dim=-1)
    outputs = decode_kernel.mix(probabilities, values)
    expected = torch.matmul(probabilities, values.float())
    torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-6)


def _scores_in_order(queries, keys, head):
    """The kernel's documented sums: per lane l of 16, the products of dims l, l + 16, ... (a
    multiply, then fused multiply-adds); then lanes j + j + 8, those j + j + 4, T0 + T2 and
    T1 + T3, and the two."""
    rows, kv_heads, _, groups, dims = queries.shape
    chunks = -(-dims // 16)
    pad = (0, chunks * 16 - dims)
    frames = torch.nn.functional.pad(queries.float(), pad).view(
        rows, kv_heads, 2, groups, 1, -1, 16
    )
    keys = torch.nn.functional.pad(keys.float(), pad).view(rows, kv_heads, 1, -1, chunks, 16)
    span = keys.shape[3]
    first = head[:, None, None, :span, None, None]
    query = torch.where(first, frames[:, :, 0, :, :], frames[:, :, 1, :, :])  # per key
    lanes = query[..., 0, :] * keys[..., 0, :]
    for c in range(1, chunks):
        lanes = fused_multiply_add(query[..., c, :], keys[..., c, :], lanes)
    eighths = lanes[..., :8] + lanes[..., 8:]
    quarters = eighths[..., :4] + eighths[..., 4:]
    return (quarters[..., 0] + quarters[..., 2]) + (quarters[..., 1] + quarters[..., 3])


@pytest.mark.parametrize("dims", [24, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("span", [37, LONG])
def test_every_sum_runs_in_the_documented_order_bit_for_bit(
    dims: int, dtype: torch.dtype, span: int
) -> None:
    """The order the kernels document, the same with AVX-512 and with AVX2: the two give
    equal bits."""
    queries, keys, values, head = _case(dims, 3, span, dims, dtype)
    scores = decode_kernel.scores(queries, keys, head)
    assert torch.equal(scores, _scores_in_order(queries, keys, head))
    probabilities = torch.softmax(scores, dim=-1)
    outputs = torch.zeros(ROWS, KV_HEADS, 3, dims)
    for key in range(span):
        outputs = fused_multiply_add(
            probabilities[..., key, None], values[:, :, None, key].float(), outputs
        )
    assert torch.equal(decode_kernel.mix(probabilities, values), outputs)


@pytest.mark.parametrize("dims", [8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_other_rows_or_the_thread_count(
    dims: int, dtype: torch.dtype
) -> None:
    queries, keys, values, head = _case(dims, 3, LONG, dims, dtype)
    probabilities = torch.softmax(torch.randn(ROWS, KV_HEADS, 3, LONG), dim=-1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        scores = decode_kernel.scores(queries, keys, head)
        outputs = decode_kernel.mix(probabilities, values)
        torch.set_num_threads(3)
        for row in range(ROWS):
            alone = slice(row, row + 1)
            assert torch.equal(
                decode_kernel.scores(queries[alone].contiguous(), keys[alone], head[alone]),
                scores[alone],
            )
            assert torch.equal(
                decode_kernel.mix(probabilities[alone].contiguous(), values[alone]),
                outputs[alone],
            )
    finally:
        torch.set_num_threads(threads)


def _scheme(dims: int, rotary_dims: int) -> RotaryScheme:
    """A Llama rotary scheme over the first `rotary_dims` of `dims` head dims."""
    config = LlamaConfig(
        hidden_size=2 * dims,
        num_attention_heads=2,
        partial_rotary_factor=rotary_dims / dims,
        head_dim=dims,
    )
    return RotaryScheme(LlamaRotaryEmbedding(config))


# Whole and partial rotary dims, and rows whose keys stay as made (a shift of 0 turns nothing).
ROTARY_CASES = [(64, 64), (64, 32), (24, 8)]


@pytest.mark.parametrize(("dims", "rotary_dims"), ROTARY_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("turned", [True, False])
def test_the_store_writes_the_bits_of_to_stored_and_two_index_writes(
    dims: int, rotary_dims: int, dtype: torch.dtype, turned: bool
) -> None:
    scheme = _scheme(dims, rotary_dims)
    generator = torch.Generator().manual_seed(dims + rotary_dims)
    pool = torch.randn(2, ROWS + 2, KV_HEADS, SLOTS, dims, generator=generator).to(dtype)
    keys, values = pool[0, 1 : ROWS + 1], pool[1, 1 : ROWS + 1]  # a run inside a chunk
    new_keys, new_values = torch.randn(2, ROWS, KV_HEADS, 1, dims, generator=generator).to(dtype)
    slots = torch.randperm(SLOTS, generator=generator)[:ROWS]
    shifts = torch.tensor([0, 7, 1_000_003]) if turned else torch.zeros(ROWS, dtype=torch.long)
    storing = scheme.storing(shifts if turned else 0, torch.device("cpu"))
    expected_keys, expected_values = keys.clone(), values.clone()
    rows = torch.arange(ROWS)
    expected_keys[rows, :, slots] = scheme.to_stored(new_keys, storing)[:, :, 0]
    expected_values[rows, :, slots] = new_values[:, :, 0]
    untouched = pool[:, [0, ROWS + 1]].clone()
    decode_kernel.store(keys, values, new_keys, new_values, slots, storing)
    assert torch.equal(keys, expected_keys)
    assert torch.equal(values, expected_values)
    assert torch.equal(pool[:, [0, ROWS + 1]], untouched)  # the slots beside the run


@pytest.mark.parametrize(("dims", "rotary_dims"), ROTARY_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 3])
def test_queries_are_the_bits_of_the_scaled_query_and_its_turn(
    dims: int, rotary_dims: int, dtype: torch.dtype, groups: int
) -> None:
    """As the model hands them over: [rows, heads, 1, dims], a transposed view."""
    scheme = _scheme(dims, rotary_dims)
    generator = torch.Generator().manual_seed(dims * groups)
    heads = KV_HEADS * groups
    query = torch.randn(ROWS, 1, heads, dims, generator=generator).to(dtype).transpose(1, 2)
    scale = dims**-0.5
    turning = scheme.turning(torch.tensor([3, 0, 250_001]), torch.device("cpu"), dtype)
    scaled = query * scale
    made = scaled.reshape(ROWS, KV_HEADS, groups, dims)
    turned = scheme.turn(scaled, turning).reshape(ROWS, KV_HEADS, groups, dims)
    both = decode_kernel.queries(query, scale, turning, KV_HEADS)
    assert torch.equal(both, torch.stack((made, turned), dim=2))
    unturned = decode_kernel.queries(query, scale, None, KV_HEADS)
    assert torch.equal(unturned, torch.stack((made, made), dim=2))


@pytest.mark.parametrize("dims", [64, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_has_the_bits_of_the_models_rotary_function(
    dims: int, dtype: torch.dtype
) -> None:
    """As the model hands them over: views of one projection's outputs [rows, 1, width],
    at in-cache positions far apart (large angles round differently)."""
    config = LlamaConfig(hidden_size=2 * dims, num_attention_heads=2, head_dim=dims)
    rotary_embedding = LlamaRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(dims)
    heads, groups = KV_HEADS * 3, 3
    projected = torch.randn(ROWS, 1, (heads + KV_HEADS) * dims, generator=generator).to(dtype)
    # what rounds past the largest float, or is no number, in both halves of a head
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38, -3e38])
    projected[0, 0, : len(special)] = projected[1, 0, dims // 2 : dims // 2 + len(special)] = (
        special.to(dtype)
    )
    query, key = (
        part.view(ROWS, 1, -1, dims).transpose(1, 2)
        for part in projected.split([heads * dims, KV_HEADS * dims], dim=-1)
    )
    positions = torch.tensor([[0], [517], [4093]])
    cos, sin = rotary_embedding(projected, positions)
    expected = apply_rotary_pos_emb(query, key, cos, sin)
    turned = decode_kernel.rotary(query, key, cos, sin)
    for ours, theirs in zip(turned, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert turned[0].shape == (ROWS, groups * KV_HEADS, 1, dims)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        decode_kernel.rotary(
            query, key, cos.float() if dtype != torch.float32 else cos.double(), sin
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_adds_to_the_scores_as_attention_adds_it(dtype: torch.dtype) -> None:
    queries, keys, _, head = _case(64, 3, LONG, seed=2, dtype=dtype)
    mask = torch.randn(ROWS, 1, 1, LONG + 20).to(dtype)  # longer than the span, as a step's is
    mask[:, :, :, 250:270] = torch.finfo(dtype).min  # across two tasks of keys
    expected = decode_kernel.scores(queries, keys, head).add_(mask[..., :LONG])
    assert torch.equal(decode_kernel.scores(queries, keys, head, mask), expected)


def test_tensors_the_kernels_cannot_read_are_refused_or_left_to_torch() -> None:
    queries, keys, values, head = _case(64, 3, 37, seed=1)
    assert decode_kernel.takes(keys, values)
    assert not decode_kernel.takes(keys.double(), values.double())
    assert not decode_kernel.takes(keys.bfloat16(), values)  # one dtype for both
    assert not decode_kernel.takes(keys.transpose(2, 3), values)  # dims not one after another
    with pytest.raises(RuntimeError, match="queries must be contiguous"):
        decode_kernel.scores(queries.transpose(3, 4), keys, head)
    with pytest.raises(RuntimeError, match="head must be bool"):
        decode_kernel.scores(queries, keys, head.float())
    with pytest.raises(RuntimeError, match="mask must be"):
        decode_kernel.scores(queries, keys, head, torch.zeros(ROWS, 1, 1, 36))  # short of span
    new = torch.zeros(ROWS, KV_HEADS, 1, 64)
    with pytest.raises(RuntimeError, match="out of range"):
        decode_kernel.store(keys, values, new, new, torch.tensor([0, 1, SLOTS]), None)
    with pytest.raises(RuntimeError, match="cos and sin must be"):
        decode_kernel.store(keys, values, new, new, torch.zeros(ROWS, dtype=torch.long), (new, new))
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        decode_kernel.queries(torch.zeros(ROWS, 5, 1, 64), 1.0, None, KV_HEADS)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
)  # in bfloat16 the matmuls' probabilities are rounded to it, the kernels' are not
@torch.inference_mode()
def test_a_batched_step_through_the_kernels_matches_torchs_matmuls(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tolerance: float
) -> None:
    """Through a whole model: rows of different lengths, rings turned or not."""
    model = tiny_model("llama").to(dtype)
    make_batch_invariant(model)  # packed anew for the dtype, as a loaded model is

    def steps() -> list[torch.Tensor]:
        pool = KVPool(model.config.num_hidden_layers)
        caches = [SinkCache.for_model(model, 24, 4, pool) for _ in range(4)]
        for seed, (cache, length) in enumerate(zip(caches, (5, 19, 23, 41), strict=True)):
            ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))
            for piece in ids.split(8):
                forward_step(model, cache, piece)
        return [batch_forward(model, caches, torch.arange(4) + 4 * step) for step in range(6)]

    calls = []
    scores = decode_kernel.scores
    monkeypatch.setattr(decode_kernel, "scores", lambda *args: calls.append(1) or scores(*args))
    kernels = steps()
    assert len(calls) == 6 * model.config.num_hidden_layers  # every layer of every step
    monkeypatch.setattr(decode_kernel, "takes", lambda keys, values: False)
    matmuls = steps()
    for ours, theirs in zip(kernels, matmuls, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=10 * tolerance, atol=tolerance)
