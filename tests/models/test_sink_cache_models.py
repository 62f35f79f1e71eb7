"""The sink cache on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from tests.cache_probes import kept_token_ids
from tests.models.reference import ReferenceCache
from tests.models.tiny_models import VOCAB, tiny_configs, tiny_model
from worker.exceptions import CacheCapacityError, UnsupportedModelError
from worker.model.compat import cache_argument
from worker.model.layer_kinds import layer_kinds
from worker.model.positions import SCHEMES
from worker.model.sink_cache import SinkCache

ARCHITECTURES = sorted(tiny_configs())


def _sink_cache(model: torch.nn.Module, capacity: int, sinks: int = 4) -> SinkCache:
    return SinkCache(layer_kinds(model, capacity), capacity, sinks)


def _run(model, cache, ids: torch.Tensor, chunk: int, make_room=None) -> torch.Tensor:
    """Logits of every token of `ids`, fed `chunk` tokens per forward."""
    outs = []
    passed = cache_argument(model, cache)
    with torch.no_grad():
        for piece in ids.split(chunk):
            if isinstance(cache, SinkCache):
                with cache.step(piece):
                    outs.append(model(piece[None], **passed, use_cache=True).logits)
            else:
                cache.make_room(len(piece))
                outs.append(model(piece[None], **passed, use_cache=True).logits)
    return torch.cat(outs, dim=1)[0]


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("chunk", [1, 5])
def test_logits_equal_plain_forward_before_first_eviction(name: str, chunk: int) -> None:
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(1))
    cached = _run(model, _sink_cache(model, capacity=64), ids, chunk)
    with torch.no_grad():
        plain = model(ids[None]).logits[0]
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize(("chunk", "capacity"), [(1, 24), (3, 24), (7, 24), (40, 96)])
def test_logits_equal_reference_across_many_evictions(name: str, chunk: int, capacity) -> None:
    """Chunks of 40 go through SDPA (attention.FLASH_QUERIES), shorter ones through matmuls."""
    model = tiny_model(name)
    sinks = 4
    ids = torch.randint(0, VOCAB, (5 * capacity,), generator=torch.Generator().manual_seed(2))
    cache = _sink_cache(model, capacity, sinks)
    actual = _run(model, cache, ids, chunk)
    reference = ReferenceCache(model, model.config.num_hidden_layers, capacity, sinks)
    expected = _run(model, reference, ids, chunk)
    assert cache.layout.evicted_total > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    kept = reference.layers[0].kept
    assert kept_token_ids(cache).tolist() == ids[kept].tolist()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_window_without_sinks_differs_from_sink_cache(name: str) -> None:
    """Evicting the first tokens changes the output: the sinks are really kept."""
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (60,), generator=torch.Generator().manual_seed(3))
    with_sinks = _run(model, _sink_cache(model, 24, sinks=4), ids, 1)
    without = _run(model, _sink_cache(model, 24, sinks=0), ids, 1)
    assert torch.allclose(with_sinks[:20], without[:20], atol=1e-5)
    assert (with_sinks[-10:] - without[-10:]).abs().max() > 1e-4


def test_every_registered_architecture_has_a_tiny_model() -> None:
    covered = {tiny_configs()[name].model_type for name in ARCHITECTURES}
    assert covered == set(SCHEMES)


def test_unsupported_architecture_is_refused_by_name() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*supported: "):
        layer_kinds(model, 16)


def test_a_cache_past_where_longrope_tables_switch_is_refused() -> None:
    from transformers import AutoModelForCausalLM, Phi3Config

    factors = [1.0] * 4
    config = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": factors,
            "long_factor": factors,
        },
        original_max_position_embeddings=32,  # Phi-3 reads it here
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert len(layer_kinds(model, 32)) == 1
    with pytest.raises(CacheCapacityError, match="longrope"):
        layer_kinds(model, 33)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_cache_restored_from_incremental_snapshots_goes_on_exactly(name: str) -> None:
    """Every architecture's layers (Gemma 3's full and sliding ones too) share one slot
    layout and shape, so the pieces of every layer are saved and laid down together."""
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(4))
    cache = _sink_cache(model, 24)
    saved: dict[str, torch.Tensor] = {}
    for start in range(0, 60, 15):  # the ring turns between snapshots
        _run(model, cache, ids[start : start + 15], 5)
        snapshot = cache.snapshot()
        saved = {piece: saved[piece] for piece in snapshot.kept} | snapshot.tensors
        cache.saved(snapshot)
    assert snapshot.kept  # the last snapshot named saved pieces instead of carrying them
    restored = _sink_cache(model, 24)
    restored.load(saved, snapshot.meta)
    assert torch.equal(_run(model, restored, ids[60:], 1), _run(model, cache, ids[60:], 1))
