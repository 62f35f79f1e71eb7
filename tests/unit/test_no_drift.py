"""Keys kept through many window shifts equal freshly rotated pre-RoPE keys (no drift): as
stored (at their stream positions, past 100,000) and as attention gets them (in the cache)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tests.cache_probes import kept_stored_keys, kept_token_ids, slot_order
from worker.model.layer_kinds import uniform
from worker.model.positions import RotaryScheme
from worker.model.sink_cache import SinkCache

HEADS, DIM, CAPACITY, SINKS = 2, 16, 12, 4


def _rotary() -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=HEADS * DIM, num_attention_heads=HEADS, rope_theta=10000.0)
    return LlamaRotaryEmbedding(config)


def _rotated_exactly(
    rotary: LlamaRotaryEmbedding, keys: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """`keys` rotated to `positions`, the angles in float64 (float32's are off by 1e-2 there)."""
    angles = positions.double()[:, None] * rotary.inv_freq.double()
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    half = keys.shape[-1] // 2
    turned = torch.cat((-keys[..., half:], keys[..., :half]), -1).double()
    return (keys.double() * cos + turned * sin).float()


def test_kept_keys_after_100k_shifts_equal_fresh_rotation() -> None:
    rotary = _rotary()
    cache = SinkCache(uniform(RotaryScheme(rotary), 1), capacity=CAPACITY, sinks=SINKS)
    generator = torch.Generator().manual_seed(0)
    steps = 100_050
    pre_rope = torch.randn(steps, HEADS, DIM, generator=generator)
    layer = cache.layers[0]
    table_cos, table_sin = rotary(pre_rope, torch.arange(CAPACITY)[None])
    for t in range(steps):
        with cache.step(torch.tensor([t])) as plan:
            at = slice(plan.length_before, plan.length_before + 1)
            key = pre_rope[t][None, :, None]
            rotated, _ = apply_rotary_pos_emb(key, key, table_cos[:, at], table_sin[:, at])
            attention_keys, _ = layer.update(rotated, key)
    assert cache.layout.evicted_total > 100_000
    kept = kept_token_ids(cache)
    kept_pre_rope = pre_rope[kept].permute(1, 0, 2)[None]
    at_stream = _rotated_exactly(rotary, kept_pre_rope, kept)
    torch.testing.assert_close(kept_stored_keys(cache, 0), at_stream, rtol=0, atol=1e-5)
    fresh, _ = apply_rotary_pos_emb(kept_pre_rope, kept_pre_rope, table_cos, table_sin)
    # A single query gets the keys in slot order once the ring has turned: compare by position.
    in_position_order = attention_keys.index_select(2, slot_order(cache.layout))
    torch.testing.assert_close(in_position_order, fresh, rtol=0, atol=1e-5)
