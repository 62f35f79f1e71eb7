"""What a saved cache depends on besides the weights, by name, so a mismatch is named.

The model fingerprint already hashes the config and the dtype, so any of these that differs
also changes it; recorded apart, a refusal says what differs (`dtype=float32` against
`bfloat16` after a move from CPU to GPU, a rope theta, a layer that turned sliding) instead of
"another model". The values are plain data, as the config has them, for cache_store to compare
without knowing what they mean.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from worker.model.cache_settings import CacheSettings
from worker.model.layer_kinds import layer_types


def cache_identity(model: PreTrainedModel, settings: CacheSettings) -> dict[str, Any]:
    """The fields a saved state records and a restore compares, one by one."""
    config = model.config
    rope = _plain(getattr(config, "rope_parameters", None))
    return {
        "dtype": str(model.dtype).removeprefix("torch."),
        "rope": rope,
        "partial_rotary_factor": _partial_rotary_factor(config, rope),
        "layer_types": layer_types(config),
        "cache_capacity": settings.capacity,
        "cache_sinks": settings.sinks,
    }


def _partial_rotary_factor(config: PretrainedConfig, rope: Any) -> float | None:
    """Where the model keeps it: in its rope parameters (transformers 5), else on the config;
    1.0 (every dimension rotated) where a rope model names none, None without rope."""
    if isinstance(rope, dict) and "partial_rotary_factor" in rope:
        return rope["partial_rotary_factor"]
    return getattr(config, "partial_rotary_factor", None if rope is None else 1.0)


def _plain(value: Any) -> Any:
    """Tuples as lists, anything else json cannot hold as its str: what msgpack gives back."""
    return json.loads(json.dumps(value, default=str))
