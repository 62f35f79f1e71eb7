"""One batched decode forward over many sink caches gives each stream what it gets alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from tests.models.reference import ReferenceCache
from tests.models.tiny_models import VOCAB, tiny_configs, tiny_loaded, tiny_model
from worker.exceptions import CacheDamagedError
from worker.model.batch_cache import batch_forward
from worker.model.batch_invariance import is_batch_invariant
from worker.model.cache_settings import CacheSettings
from worker.model.compat import cache_argument
from worker.model.decoder import Decoder, forward_step
from worker.model.sampling import Sampler, repetition_controls
from worker.model.scheduler import GenerationRequest, Scheduler
from worker.model.sink_cache import SinkCache

ARCHITECTURES = sorted(tiny_configs())
CAPACITY, SINKS, CHUNK = 24, 4, 8
# Rows of different lengths: short, about to fill (it evicts a few steps in), full (it evicts
# from the first step on), and one whose ring has long turned.
PROMPTS = (5, 19, 23, 41)


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def _cache(model: torch.nn.Module) -> SinkCache:
    return SinkCache.for_model(model, CAPACITY, SINKS)


def _reference_step(model: torch.nn.Module, cache: ReferenceCache, ids: torch.Tensor):
    cache.make_room(len(ids))
    return model(ids[None], **cache_argument(model, cache), use_cache=True).logits[0, -1]


def _batchable() -> list[str]:
    """The models whose decode steps are batched: rotary keys, streamsink's kernels."""
    return [
        name
        for name in ARCHITECTURES
        if _cache(tiny_model(name)).order_free and is_batch_invariant(tiny_model(name))
    ]


@pytest.mark.parametrize("name", _batchable())
@torch.inference_mode()
def test_batched_step_logits_equal_each_stream_alone_and_the_reference(name: str) -> None:
    model = tiny_model(name)
    prompts = [_ids(length, seed) for seed, length in enumerate(PROMPTS)]
    batched, alone = [_cache(model) for _ in prompts], [_cache(model) for _ in prompts]
    layers = model.config.num_hidden_layers
    references = [ReferenceCache(model, layers, CAPACITY, SINKS) for _ in prompts]
    for prompt, *caches in zip(prompts, batched, alone, strict=True):
        for cache in caches:
            for piece in prompt.split(CHUNK):
                forward_step(model, cache, piece)
    for prompt, reference in zip(prompts, references, strict=True):
        for piece in prompt.split(CHUNK):
            _reference_step(model, reference, piece)
    tokens = _ids(len(prompts), 99)
    for _ in range(12):
        together = batch_forward(model, batched, tokens)
        each = _each_alone(lambda c, t: forward_step(model, c, t)[-1], alone, tokens)
        slow = _each_alone(lambda r, t: _reference_step(model, r, t), references, tokens)
        torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together, slow, rtol=1e-4, atol=1e-5)
        assert together.argmax(-1).tolist() == each.argmax(-1).tolist()
        tokens = each.argmax(-1)
    assert [c.layout.to_meta() for c in batched] == [c.layout.to_meta() for c in alone]
    evicted = [cache.layout.evicted_total for cache in batched]
    assert evicted[0] == 0 and all(evicted[1:])


@pytest.mark.parametrize("name", ["llama", "gemma3-hybrid", "qwen3"])
@torch.inference_mode()
def test_young_rows_that_attend_over_fewer_slots_equal_each_stream_alone(name: str) -> None:
    """In a cache of 300 the rows attend over 128, 256 and 300 slots (batch_cache.attended)."""
    model = tiny_model(name)
    lengths, capacity = (20, 140, 290), 300
    batched = [SinkCache.for_model(model, capacity, SINKS) for _ in lengths]
    alone = [SinkCache.for_model(model, capacity, SINKS) for _ in lengths]
    for seed, (length, *caches) in enumerate(zip(lengths, batched, alone, strict=True)):
        for cache in caches:
            for piece in _ids(length, seed).split(4 * CHUNK):
                forward_step(model, cache, piece)
    tokens = _ids(len(lengths), 98)
    for _ in range(3):
        together = batch_forward(model, batched, tokens)
        each = _each_alone(lambda c, t: forward_step(model, c, t)[-1], alone, tokens)
        torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-5)
        tokens = each.argmax(-1)


def _each_alone(step, caches: list, tokens: torch.Tensor) -> torch.Tensor:
    """Each cache's own forward of its token: the logits as rows."""
    return torch.stack(
        [step(cache, token[None]) for cache, token in zip(caches, tokens, strict=True)]
    )


@pytest.mark.parametrize("controlled", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt_neox-partial", "falcon-alibi", "bloom", "mpt"])
def test_a_stream_writes_the_same_tokens_whatever_batch_it_is_in(
    name: str, controlled: bool
) -> None:
    """Rows leave the batch at their own lengths; ALiBi models run one forward per item.
    Repetition control runs per row, over each row's own history."""
    decoder = Decoder(tiny_loaded(name), CacheSettings(sinks=SINKS, window=20, max_chunk=CHUNK))
    prompts = [_ids(length, seed) for seed, length in enumerate(PROMPTS)]
    caps = [9, 14, 4, 11]
    controls = repetition_controls(1.5, 2) if controlled else []
    histories = [_ids(6, 50 + seed).tolist() if controlled else [] for seed in range(len(caps))]

    def generate(rows: range) -> list[list[int]]:
        return Scheduler(decoder).generate(
            [
                GenerationRequest(
                    decoder.new_cache(),
                    prompts[i],
                    Sampler(LogitsProcessorList(controls)),
                    caps[i],
                    frozenset(),
                    histories[i],
                )
                for i in rows
            ]
        )

    alone = [generate(range(i, i + 1))[0] for i in range(len(prompts))]
    assert generate(range(2)) == alone[:2]
    assert generate(range(len(prompts))) == alone
    if controlled:  # no row repeats a pair of tokens of its history or of what it wrote
        for history, tokens in zip(histories, alone, strict=True):
            seen = history + tokens
            pairs = list(zip(seen, seen[1:], strict=False))
            assert len(set(pairs)) == len(pairs)
    assert decoder.new_cache().order_free == (name in _batchable())


@torch.inference_mode()
def test_a_damaged_row_is_refused_before_any_cache_moves() -> None:
    model = tiny_model("llama")
    caches = [_cache(model) for _ in range(3)]
    for seed, cache in enumerate(caches):
        forward_step(model, cache, _ids(CAPACITY, seed))
    caches[2].damaged = True
    before = [cache.layout.to_meta() for cache in caches]
    with pytest.raises(CacheDamagedError):
        batch_forward(model, caches, _ids(3, 7))
    assert [cache.layout.to_meta() for cache in caches] == before
    assert [cache.damaged for cache in caches] == [False, False, True]


@torch.inference_mode()
def test_a_batched_forward_that_fails_commits_no_row_and_damages_only_rows_that_evicted() -> None:
    model = tiny_model("llama")
    short, full = _cache(model), _cache(model)  # the full one evicts to take its token
    forward_step(model, short, _ids(5, 0))
    forward_step(model, full, _ids(CAPACITY, 1))
    before = [(cache.layout.to_meta(), cache.token_ids.clone()) for cache in (short, full)]

    def failing(module: torch.nn.Module, args: object, output: object) -> None:
        raise RuntimeError("out of memory")

    hook = model.base_model.layers[1].self_attn.o_proj.register_forward_hook(failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        batch_forward(model, [short, full], _ids(2, 2))
    hook.remove()
    for cache, (layout, ids) in zip((short, full), before, strict=True):
        assert cache.layout.to_meta() == layout
        assert torch.equal(cache.token_ids, ids)
        assert [layer.length for layer in cache.layers] == [layout["length"]] * len(cache.layers)
    assert (short.damaged, full.damaged) == (False, True)
    batch_forward(model, [short], _ids(1, 3))  # the one left intact goes on
    assert short.layout.length == 6 and short.token_ids[5] == _ids(1, 3)[0]


@torch.inference_mode()
def test_a_cache_given_twice_is_refused_before_any_cache_moves() -> None:
    model = tiny_model("llama")
    cache = _cache(model)
    forward_step(model, cache, _ids(5, 0))
    with pytest.raises(ValueError, match="only one row"):
        batch_forward(model, [cache, cache], _ids(2, 1))
    assert cache.layout.length == 5 and not cache.damaged
