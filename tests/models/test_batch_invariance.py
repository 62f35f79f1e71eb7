"""A stream's forwards do not depend on the streams that share them, nor on the thread count:
bit for bit.

Each stream decodes alone, then in batches of other sizes beside other streams of other
lengths (before and after their rings turn); its logits must be equal, not just close.
"""

from __future__ import annotations

import pytest
import torch

from tests.models.tiny_models import VOCAB, tiny_configs, tiny_model
from worker.model import batch_cache, cpu_kernels, decode_kernel, linear_kernel, norm_kernel
from worker.model.attention import FLASH_QUERIES, decoding
from worker.model.batch_cache import batch_forward
from worker.model.batch_invariance import is_batch_invariant, make_batch_invariant, stock_kernels
from worker.model.decoder import forward_step
from worker.model.kv_pool import KVPool
from worker.model.sink_cache import SinkCache

CAPACITY, SINKS, CHUNK, STEPS = 24, 4, 8, 10
LENGTHS = (5, 19, 23, 41, 11, 30)  # short, about to evict, full, long turned, ...
# A cache long enough that young rows attend over fewer slots than others (batch_cache.attended)
WIDE, WIDE_LENGTHS = 300, (20, 140, 290, 400, 60, 260)


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def _prefilled(
    model: torch.nn.Module, length: int, seed: int, pool: KVPool | None, capacity: int
) -> SinkCache:
    cache = SinkCache.for_model(model, capacity, SINKS, pool)
    for piece in _ids(length, seed).split(CHUNK if capacity == CAPACITY else 4 * CHUNK):
        forward_step(model, cache, piece)
    return cache


def _batch(model: torch.nn.Module, caches: list[SinkCache], tokens: list[torch.Tensor]):
    return batch_forward(model, caches, torch.cat(tokens))


def _decode(
    model: torch.nn.Module,
    groups: list[list[int]],
    shared: bool = True,
    capacity: int = CAPACITY,
    lengths: tuple[int, ...] = LENGTHS,
) -> dict[int, list[torch.Tensor]]:
    """Every stream's logits over STEPS greedy steps, the streams batched in `groups`; their
    caches in one pool (adjacent slots read as one run), or each in its own."""
    pool = KVPool(model.config.num_hidden_layers) if shared else None
    caches = {i: _prefilled(model, n, i, pool, capacity) for i, n in enumerate(lengths)}
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in caches}
    tokens = {i: torch.tensor([i + 1]) for i in caches}
    for _ in range(STEPS):
        for group in groups:
            rows = _batch(model, [caches[i] for i in group], [tokens[i] for i in group])
            for i, row in zip(group, rows, strict=True):
                logits[i].append(row)
                tokens[i] = row.argmax()[None]
    return logits


@pytest.fixture(params=["ours", "stock"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs with cpu_kernels.py's kernels where this CPU has them, and again with
    oneDNN's linear layers, torch's attention matmuls and transformers' norms, the path of every
    other CPU (for the models the test makes)."""
    if request.param == "stock":
        monkeypatch.setattr(decode_kernel, "takes", lambda keys, values: False)
        monkeypatch.setattr(linear_kernel, "takes", lambda weight: False)
        monkeypatch.setattr(norm_kernel, "takes", lambda x, weight: False)
    elif not cpu_kernels.status().ready:
        pytest.skip(f"no CPU kernels: {cpu_kernels.status().detail}")
    return request.param


def _batchable() -> list[str]:
    return [
        name
        for name in sorted(tiny_configs())
        if SinkCache.for_model(tiny_model(name), CAPACITY, SINKS).order_free
        and is_batch_invariant(tiny_model(name))
    ]


def test_models_whose_kernels_cannot_be_made_row_independent_say_so() -> None:
    """Falcon calls SDPA itself and gpt-oss has expert blocks: their rows are not batched."""
    assert not is_batch_invariant(tiny_model("falcon-rotary"))
    assert not is_batch_invariant(tiny_model("gpt_oss-sinks"))
    assert is_batch_invariant(tiny_model("llama"))


@pytest.mark.parametrize("name", _batchable())
@pytest.mark.usefixtures("kernels")
@torch.inference_mode()
def test_a_streams_logits_are_the_same_bits_in_any_batch(name: str) -> None:
    model = tiny_model(name)
    streams = list(range(len(LENGTHS)))
    alone = _decode(model, [[i] for i in streams], shared=False)
    for groups in ([streams], [[0, 1], [2, 3, 4, 5]], [[5, 3, 1], [0], [4, 2]]):
        together = _decode(model, groups)
        for i in streams:
            for step, (a, b) in enumerate(zip(alone[i], together[i], strict=True)):
                assert torch.equal(a, b), f"stream {i} step {step} in {groups}"


@pytest.mark.usefixtures("kernels")
@torch.inference_mode()
def test_a_bfloat16_streams_logits_are_the_same_bits_in_any_batch() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    make_batch_invariant(model)  # packed anew for the dtype, as a loaded model is
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not is_batch_invariant(model)  # its streams decode alone
        pytest.skip("this CPU has no bfloat16 path for oneDNN's matmul")
    streams = list(range(len(LENGTHS)))
    alone = _decode(model, [[i] for i in streams], shared=False)
    together = _decode(model, [[5, 3, 1], [0], [4, 2]])
    for i in streams:
        assert all(torch.equal(a, b) for a, b in zip(alone[i], together[i], strict=True)), i


@pytest.mark.parametrize("name", ["llama", "gemma3-hybrid"])
@pytest.mark.usefixtures("kernels")
@torch.inference_mode()
def test_rows_attending_over_fewer_slots_are_the_same_bits_in_any_batch(name: str) -> None:
    model = tiny_model(name)
    streams = list(range(len(WIDE_LENGTHS)))
    wide = {"capacity": WIDE, "lengths": WIDE_LENGTHS}
    alone = _decode(model, [[i] for i in streams], shared=False, **wide)
    for groups in ([streams], [[5, 0, 2], [1, 3, 4]]):
        together = _decode(model, groups, **wide)
        for i in streams:
            assert all(torch.equal(a, b) for a, b in zip(alone[i], together[i], strict=True))


@torch.inference_mode()
def test_rows_of_adjacent_slots_share_a_run_whatever_their_spans_where_our_kernels_read_them(
    kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One kernel call a layer for the run, not one a span; torch's matmuls keep a span a run.
    (The tests above check that the bits do not change.)"""
    model = tiny_model("llama")
    pool = KVPool(model.config.num_hidden_layers)
    caches = [_prefilled(model, n, i, pool, WIDE) for i, n in enumerate(WIDE_LENGTHS[:4])]
    seen = []

    def spy(frames):
        seen.append(frames.runs)
        return decoding(frames)

    monkeypatch.setattr(batch_cache, "decoding", spy)
    _batch(model, caches, [torch.tensor([1])] * len(caches))
    spans = [batch_cache.attended(n + 1, WIDE) for n in WIDE_LENGTHS[:4]]
    expected = [max(spans)] if kernels == "ours" else set(spans)
    assert sorted(run.span for run in seen[0]) == sorted(expected)


@pytest.mark.parametrize("name", ["llama", "gemma3-hybrid"])
@pytest.mark.usefixtures("kernels")
@torch.inference_mode()
def test_a_streams_prefill_and_decode_are_the_same_bits_on_any_thread_count(name: str) -> None:
    """So a stream that moves to a worker given more CPUs goes on exactly."""
    model = tiny_model(name)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _decode(model, [list(range(len(LENGTHS)))])
        torch.set_num_threads(3)
        three = _decode(model, [list(range(len(LENGTHS)))])
    finally:
        torch.set_num_threads(threads)
    for i in range(len(LENGTHS)):
        assert all(torch.equal(a, b) for a, b in zip(one[i], three[i], strict=True)), i


@pytest.mark.parametrize("name", ["llama", "gemma3-hybrid"])
@torch.inference_mode()
def test_long_prefill_chunks_are_the_same_bits_on_any_thread_count(name: str) -> None:
    """Chunks long enough to go through SDPA (attention.FLASH_QUERIES), the ring turned."""
    model = tiny_model(name)
    ids = _ids(3 * FLASH_QUERIES + 9, 7)

    def prefill(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        cache = SinkCache.for_model(model, 2 * FLASH_QUERIES + 8, SINKS)
        return torch.cat([forward_step(model, cache, p) for p in ids.split(FLASH_QUERIES + 1)])

    threads = torch.get_num_threads()
    try:
        one, three = prefill(1), prefill(3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


@torch.inference_mode()
def test_the_stock_kernels_are_what_makes_the_difference() -> None:
    """With transformers' own kernels a row's bits follow its batch and the thread count (else
    the tests above are moot); ours stay close to them. Plain forwards of a token, no cache."""
    model = tiny_model("llama")
    rows = torch.stack([_ids(1, seed) for seed in range(len(LENGTHS))])

    def last_logits(threads: int, group: list[int]) -> torch.Tensor:
        torch.set_num_threads(threads)
        return model(input_ids=rows[group]).logits[:, -1]

    threads = torch.get_num_threads()
    try:
        ours = last_logits(2, list(range(len(LENGTHS))))
        with stock_kernels(model):
            alone = torch.cat([last_logits(2, [i]) for i in range(len(LENGTHS))])
            together = last_logits(2, list(range(len(LENGTHS))))
            on_one_thread = last_logits(1, list(range(len(LENGTHS))))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(ours, alone, rtol=1e-4, atol=1e-5)
    assert not torch.equal(alone, together) or not torch.equal(together, on_one_thread)
