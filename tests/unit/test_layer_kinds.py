"""Which models the sink cache takes, read off their configs alone (no weights), and which
it refuses, by name and with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config

from worker.exceptions import UnsupportedModelError
from worker.model.layer_kinds import LayerKind, position_limit, require_placeable
from worker.model.loading import load_model, max_cache_of
from worker.model.positions import AlibiScheme

SMALL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def test_layers_the_cache_cannot_place_are_refused_by_type() -> None:
    config = Qwen3Config(**SMALL, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(UnsupportedModelError, match="qwen3 has layers of type chunked_attention"):
        require_placeable(config)


def test_a_bidirectional_gemma3_is_refused() -> None:
    config = Gemma3TextConfig(**SMALL, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="attends both ways"):
        require_placeable(config)


def test_a_refused_config_is_refused_before_any_weight_loads(tmp_path: Path) -> None:
    config = Qwen3Config(**SMALL, layer_types=["full_attention", "linear_attention"])
    config.save_pretrained(tmp_path)  # a config and no weights at all
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3"
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        load_model(str(tmp_path), device="cpu")


def test_hybrid_models_are_not_limited_by_their_sliding_window() -> None:
    gemma3 = Gemma3TextConfig(**SMALL, sliding_window=512, max_position_embeddings=32768)
    assert max_cache_of(gemma3) == 32768
    # A model that slides every layer without naming layer types keeps the window as a limit.
    mistral = MistralConfig(**SMALL, sliding_window=4096, max_position_embeddings=32768)
    assert max_cache_of(mistral) == 4096


def test_longrope_limits_the_cache_to_where_its_tables_switch() -> None:
    factors = [1.0] * 4
    config = Phi3Config(
        **SMALL,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": factors,
            "long_factor": factors,
        },
        original_max_position_embeddings=256,  # Phi-3 reads it here
        pad_token_id=0,
    )
    assert position_limit(config) == 256
    assert max_cache_of(config) == 256
    assert position_limit(Phi3Config(**SMALL, pad_token_id=0)) is None


def test_a_full_layer_sees_every_position_and_a_sliding_one_its_window() -> None:
    full, sliding = LayerKind("full_attention", AlibiScheme()), LayerKind("s", AlibiScheme(), 4)
    assert [full.first_visible(n) for n in (0, 3, 100)] == [0, 0, 0]
    # After n tokens, the next query (at n) sees n-3..n: four positions.
    assert [sliding.first_visible(n) for n in (0, 3, 4, 100)] == [0, 0, 1, 97]
