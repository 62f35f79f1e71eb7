"""A slow, obviously correct StreamingLLM cache to check the real one against.

It keeps every token's position-free key and value in Python lists, forever. Before each
forward it picks the kept tokens by plain list slicing (the sinks, then the most recent ones so
that the new tokens fit), and rotates the kept keys freshly to positions 0..n-1 with cos/sin it
asks the model's own rotary module for (with each layer's own type, where the bases differ).
No ring buffer, no cached tables, no slot arithmetic, and no masks of its own: every layer
returns every kept key, so the model's own masks (sliding ones for its sliding layers) apply
exactly as when it runs over the kept tokens at positions 0..n-1.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from worker.model.compat import LayerAcrossReleases


def rotary_module(model: torch.nn.Module) -> torch.nn.Module | None:
    config = model.config
    if config.model_type in ("bloom", "mpt") or getattr(config, "alibi", False):
        return None
    return next(m for name, m in model.named_modules() if name.endswith("rotary_emb"))


def _cos_sin(
    rotary: torch.nn.Module, positions: list[int], layer_type: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own cos/sin; Gemma 3's rotary module takes the layer type (its bases)."""
    probe = torch.zeros(1, dtype=torch.float32)
    by_type = (
        {"layer_type": layer_type}
        if hasattr(rotary, "rope_type") and isinstance(rotary.rope_type, dict)
        else {}
    )
    cos, sin = rotary(probe, position_ids=torch.tensor([positions]), **by_type)
    if rotary.__class__.__name__.startswith("GptOss"):  # one angle per pair of dims
        cos, sin = cos.repeat(1, 1, 2), sin.repeat(1, 1, 2)
    return cos[0], sin[0]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x[..., :d] rotated by angles whose cos/sin are given (d = cos width); the rest passes."""
    d = cos.shape[-1]
    a, b = x[..., : d // 2], x[..., d // 2 : d]
    c, s = cos[..., : d // 2], sin[..., : d // 2]
    return torch.cat((a * c - b * s, b * c + a * s, x[..., d:]), dim=-1)


def _unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    scale = cos.square() + sin.square()
    return _rotate(x, cos / scale, -sin / scale)


class _ReferenceLayer(LayerAcrossReleases, CacheLayerMixin):
    """Every layer, sliding or not, returns all kept keys: the model's own masks (a sliding
    window mask for its sliding layers) decide what each query sees."""

    def __init__(self, owner: ReferenceCache, layer_type: str | None) -> None:
        super().__init__()
        self.owner = owner
        self.layer_type = layer_type
        self.all_keys: list[torch.Tensor] = []  # one [B, H, D] position-free key per token
        self.all_values: list[torch.Tensor] = []
        self.kept: list[int] = []

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        first = len(self.kept)
        for i in range(key_states.shape[-2]):
            key = key_states[:, :, i]
            if self.owner.rotary is not None:
                cos, sin = _cos_sin(self.owner.rotary, [first + i], self.layer_type)
                key = _unrotate(key, cos, sin)
            self.all_keys.append(key)
            self.all_values.append(value_states[:, :, i])
        self.kept = self.kept + list(
            range(len(self.all_keys) - key_states.shape[-2], len(self.all_keys))
        )
        keys = torch.stack([self.all_keys[t] for t in self.kept], dim=2)
        values = torch.stack([self.all_values[t] for t in self.kept], dim=2)
        if self.owner.rotary is not None:
            cos, sin = _cos_sin(self.owner.rotary, list(range(len(self.kept))), self.layer_type)
            keys = _rotate(keys, cos[None, None], sin[None, None])
        return keys, values

    def mask_sizes(self, query_length):
        return len(self.kept) + query_length, 0

    def get_seq_length(self):
        return len(self.kept)

    def get_max_length(self):
        return -1


class ReferenceCache(Cache):
    """Sinks + window by list slicing; call `make_room(k)` before every forward of k tokens."""

    def __init__(self, model: torch.nn.Module, num_layers: int, capacity: int, sinks: int) -> None:
        self.rotary = rotary_module(model)
        self.capacity, self.sinks = capacity, sinks
        types = getattr(model.config, "layer_types", None) or [None] * num_layers
        super().__init__(layers=[_ReferenceLayer(self, t) for t in types])

    def make_room(self, new_tokens: int) -> None:
        for layer in self.layers:
            keep_recent = self.capacity - self.sinks - new_tokens
            if len(layer.kept) + new_tokens > self.capacity:
                layer.kept = layer.kept[: self.sinks] + layer.kept[len(layer.kept) - keep_recent :]
