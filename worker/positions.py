"""How each architecture encodes positions, behind one small registry.

The sink cache stores keys position-free and gives them their in-cache positions on use, so no
key is ever rotated twice and nothing drifts however many times the window shifts. A scheme
turns the keys a model produced at known positions into stored keys, and stored keys (in
position order) back into what the model's attention expects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from worker.exceptions import UnsupportedModelError


class PositionScheme(ABC):
    """Moves keys between 'as the model computed them' and 'as the cache stores them'."""

    @abstractmethod
    def to_stored(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        """Keys a model produced at positions first_position.. -> keys to store."""

    @abstractmethod
    def to_attention(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored keys in position order 0..n-1 -> keys the attention of this model expects."""


class AlibiScheme(PositionScheme):
    """ALiBi adds a bias from the key's index at attention time: keys carry no position."""

    def to_stored(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        return keys

    def to_attention(self, stored: torch.Tensor) -> torch.Tensor:
        return stored


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryScheme(PositionScheme):
    """RoPE in the rotate-half layout that transformers uses, full or partial (the first dims).

    The cos/sin tables come from the model's own rotary module, so scaled variants (linear,
    llama3, yarn with its attention factor) are covered without knowing their formulas: the
    inverse divides by cos^2 + sin^2, which is the squared scale.
    """

    def __init__(self, rotary: nn.Module, capacity: int) -> None:
        self._rotary = rotary
        self._capacity = capacity
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos, sin, inverse cos, inverse sin) for positions 0..capacity-1, made once per dtype."""
        key = (device, dtype)
        if key not in self._tables:
            probe = torch.zeros(1, dtype=torch.float32, device=device)
            positions = torch.arange(self._capacity, device=device)[None]
            cos, sin = self._rotary(probe, position_ids=positions)
            cos, sin = cos[0].float(), sin[0].float()
            scale = cos.square() + sin.square()
            self._tables[key] = tuple(
                t.to(dtype)[None, None] for t in (cos, sin, cos / scale, sin / scale)
            )
        return self._tables[key]

    def to_stored(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        """Undone in float32 (only the new keys), so a bf16 key is rounded once, when stored."""
        _, _, inv_cos, inv_sin = self._table(keys.device, torch.float32)
        span = slice(first_position, first_position + keys.shape[-2])
        stored = self._apply(keys.float(), inv_cos[..., span, :], -inv_sin[..., span, :])
        return stored.to(keys.dtype)

    def to_attention(self, stored: torch.Tensor) -> torch.Tensor:
        """Rotated in the model's own dtype, as its attention rotates the queries."""
        cos, sin, _, _ = self._table(stored.device, stored.dtype)
        span = slice(0, stored.shape[-2])
        return self._apply(stored, cos[..., span, :], sin[..., span, :])

    @staticmethod
    def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dim = cos.shape[-1]
        if dim == x.shape[-1]:
            return x * cos + _rotate_half(x) * sin
        rotated, passed = x[..., :dim], x[..., dim:]
        return torch.cat((rotated * cos + _rotate_half(rotated) * sin, passed), dim=-1)


def _rotary_module(model: nn.Module) -> nn.Module:
    """The model's single rotary embedding module (architectures with several are refused)."""
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"expected one rotary embedding in {type(model).__name__}, found {len(found)}"
        )
    return found[0]


def _rotary(model: nn.Module, capacity: int) -> PositionScheme:
    return RotaryScheme(_rotary_module(model), capacity)


def _alibi(model: nn.Module, capacity: int) -> PositionScheme:
    return AlibiScheme()


def _falcon(model: nn.Module, capacity: int) -> PositionScheme:
    """Falcon is ALiBi or RoPE depending on its config."""
    return _alibi(model, capacity) if model.config.alibi else _rotary(model, capacity)


SchemeFactory = Callable[[nn.Module, int], PositionScheme]

SCHEMES: dict[str, SchemeFactory] = {
    "llama": _rotary,
    "mistral": _rotary,
    "qwen2": _rotary,
    "qwen3": _rotary,
    "phi3": _rotary,
    "gemma": _rotary,
    "gpt_neox": _rotary,
    "falcon": _falcon,
    "bloom": _alibi,
    "mpt": _alibi,
}


def require_supported(model_type: str | None) -> SchemeFactory:
    """The scheme factory of an architecture, or a clear refusal naming it."""
    factory = SCHEMES.get(model_type or "")
    if factory is None:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported by the sink cache; supported: "
            f"{', '.join(sorted(SCHEMES))}. Use a model of one of these architectures."
        )
    return factory


def scheme_for(model: nn.Module, capacity: int) -> PositionScheme:
    """The position scheme of `model`."""
    return require_supported(getattr(model.config, "model_type", None))(model, capacity)
