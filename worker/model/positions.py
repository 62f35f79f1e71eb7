"""How each architecture encodes positions, behind one small registry.

The sink cache stores keys position-free and gives them their in-cache positions on use, so no
key is ever rotated twice and nothing drifts however many times the window shifts. A scheme
turns the keys a model produced at known positions into stored keys, and stored keys (in
position order) back into what the model's attention expects.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from worker.exceptions import UnsupportedModelError


class PositionScheme(ABC):
    """Moves keys between 'as the model computed them' and 'as the cache stores them'."""

    # Whether keys carry their positions themselves, so that one query's attention does not
    # depend on the order the keys come in (true for RoPE, false for ALiBi's index bias).
    order_free: bool = False

    @abstractmethod
    def to_stored(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        """Keys a model produced at positions first_position.. -> keys to store."""

    def rotation(
        self, positions: torch.Tensor | int | slice, device: torch.device, dtype: torch.dtype
    ) -> object:
        """What `to_attention` needs to place keys at `positions` (one per key, n for 0..n-1,
        or a slice of consecutive positions); made once per step and shared by the layers of
        one kind."""
        return None

    @abstractmethod
    def to_attention(
        self, stored: torch.Tensor, rotation: object, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stored keys -> the keys this model's attention expects, at the rotation's positions;
        written into `out` (shaped like `stored`) where the scheme has to make new keys."""


class AlibiScheme(PositionScheme):
    """ALiBi adds a bias from the key's index at attention time: keys carry no position."""

    def to_stored(self, keys: torch.Tensor, first_position: int) -> torch.Tensor:
        return keys

    def to_attention(
        self, stored: torch.Tensor, rotation: object, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        return stored


class RotaryScheme(PositionScheme):
    """RoPE in the rotate-half layout that transformers uses, full or partial (the first dims).

    The cos/sin tables come from the model's own rotary module, so scaled variants (linear,
    llama3, yarn with its attention factor) are covered without knowing their formulas: the
    inverse divides by cos^2 + sin^2, which is the squared scale.
    """

    order_free = True

    def __init__(self, rotary: nn.Module, capacity: int, layer_type: str | None = None) -> None:
        self._rotary = rotary
        self._capacity = capacity
        # A model whose layer types rotate with their own bases (Gemma 3) has one rotary module
        # that takes the layer type; others take none.
        self._layer_type = {"layer_type": layer_type} if layer_type else {}
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos, sin, inverse cos, inverse sin) [capacity, dims] for positions 0..capacity-1,
        made once per dtype."""
        key = (device, dtype)
        if key not in self._tables:
            probe = torch.zeros(1, dtype=torch.float32, device=device)
            positions = torch.arange(self._capacity, device=device)[None]
            cos, sin = self._rotary(probe, position_ids=positions, **self._layer_type)
            cos, sin = _duplicated(cos[0].float()), _duplicated(sin[0].float())
            scale = cos.square() + sin.square()
            self._tables[key] = tuple(t.to(dtype) for t in (cos, sin, cos / scale, sin / scale))
        return self._tables[key]

    def to_stored(self, keys: torch.Tensor, first_position: int | torch.Tensor) -> torch.Tensor:
        """Undone in float32 (only the new keys), so a bf16 key is rounded once, when stored.

        `first_position` is one per row ([rows]) when the rows of a batch sit at their own
        positions."""
        _, _, inv_cos, inv_sin = self._table(keys.device, torch.float32)
        count = keys.shape[-2]
        if isinstance(first_position, int):
            span: slice | torch.Tensor = slice(first_position, first_position + count)
        else:
            span = first_position[:, None] + torch.arange(count, device=keys.device)
        wide = keys.float()
        stored = _rotate(wide, _rows(inv_cos, span), -_rows(inv_sin, span), torch.empty_like(wide))
        return stored.to(keys.dtype)

    def rotation(
        self, positions: torch.Tensor | int | slice, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """In the model's own dtype, as its attention rotates the queries. `positions` may be
        [rows, keys]: each row of a batch rotated to its own positions."""
        cos, sin, _, _ = self._table(device, dtype)
        index = slice(0, positions) if isinstance(positions, int) else positions
        return _rows(cos, index), _rows(sin, index)

    def to_attention(
        self,
        stored: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _rotate(stored, *rotation, torch.empty_like(stored) if out is None else out)


def _duplicated(table: torch.Tensor) -> torch.Tensor:
    """The rotate-half layout's table, whose two halves repeat one angle per pair of dims.

    Most rotary modules return it so; gpt-oss returns one column per pair (its halves
    differ), which is widened here, so a partial rotation is never mistaken for it."""
    half = table.shape[-1] // 2
    if torch.equal(table[..., :half], table[..., half:]):
        return table
    return torch.cat((table, table), dim=-1)


def _rows(table: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """The table's rows at `index` ([keys], or [rows, keys]), shaped to broadcast over heads."""
    return table[index].unsqueeze(-3)


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin on the first cos.shape[-1] dims, written into `out`.

    This runs over the whole cache on every step, so it makes no temporaries (rotate_half's),
    and the caller says where the result goes (a reused buffer, see scratch.py).
    """
    dim, half = cos.shape[-1], cos.shape[-1] // 2
    torch.mul(x[..., :dim], cos, out=out[..., :dim])
    if dim != x.shape[-1]:
        out[..., dim:].copy_(x[..., dim:])
    out[..., :half].addcmul_(x[..., half:dim], sin[..., :half], value=-1)
    out[..., half:dim].addcmul_(x[..., :half], sin[..., half:])
    return out


def _rotary_module(model: nn.Module) -> nn.Module:
    """The model's single rotary embedding module (architectures with several are refused)."""
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == "rotary_emb"]
    if len(found) != 1:
        raise UnsupportedModelError(
            f"expected one rotary embedding in {type(model).__name__}, found {len(found)}"
        )
    return found[0]


def _rotary(model: nn.Module, capacity: int, layer_type: str) -> PositionScheme:
    rotary = _rotary_module(model)
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
    return RotaryScheme(rotary, capacity, layer_type if takes_type else None)


def _alibi(model: nn.Module, capacity: int, layer_type: str) -> PositionScheme:
    return AlibiScheme()


def _falcon(model: nn.Module, capacity: int, layer_type: str) -> PositionScheme:
    """Falcon is ALiBi or RoPE depending on its config."""
    rotary = not model.config.alibi
    return (_rotary if rotary else _alibi)(model, capacity, layer_type)


# (model, capacity, layer type) -> the scheme of that model's layers of that type
SchemeFactory = Callable[[nn.Module, int, str], PositionScheme]

SCHEMES: dict[str, SchemeFactory] = {
    "llama": _rotary,
    "mistral": _rotary,
    "qwen2": _rotary,
    "qwen3": _rotary,
    "phi3": _rotary,
    "gemma": _rotary,
    "gemma2": _rotary,
    "gemma3_text": _rotary,
    "gpt_neox": _rotary,
    "gpt_oss": _rotary,
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
