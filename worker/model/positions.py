"""How each architecture encodes positions, behind one small registry.

The model computes its keys at positions inside the cache (0..C-1). The cache stores each key
turned to the token's position in the stream instead, which never changes: a token evicted
from the window moves every later token's in-cache position down by one, but no stream
position. So nothing is rotated again as the window shifts (a decode step touches only its
new key), and nothing drifts however long a stream runs. Between the two frames lies one
shift per forward, the tokens evicted so far: a window token's stream position minus its
in-cache position (the head, never evicted, is in both frames at once).

A scheme turns the keys a model produced into stored keys, stored keys back into the model's
in-cache frame, and queries into the stream's frame (see attention.py), by a shift.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from worker.exceptions import UnsupportedModelError

Shift = int | torch.Tensor  # one for all keys, or [rows]: each row of a batch its own


class PositionScheme(ABC):
    """Moves keys and queries between the model's in-cache frame and the stream's."""

    # Whether keys carry their positions themselves, so that one query's attention does not
    # depend on the order the keys come in (true for RoPE, false for ALiBi's index bias).
    order_free: bool = False

    def turning(self, shift: Shift, device: torch.device, dtype: torch.dtype) -> object:
        """What `turn` needs to move by `shift` positions (None: nothing moves)."""
        return None

    def turn(
        self, x: torch.Tensor, turning: object, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x` [rows, heads, tokens, dims] moved by `turning`, into `out` if given (shaped
        like `x`); `x` itself if nothing moves."""
        return x

    def storing(self, shift: Shift, device: torch.device) -> object:
        """What `to_stored` needs to store keys `shift` positions on: made once a forward, for
        every layer of the scheme (None: nothing moves)."""
        return self.turning(shift, device, torch.float32)

    @abstractmethod
    def to_stored(self, keys: torch.Tensor, storing: object) -> torch.Tensor:
        """Keys a model computed at in-cache positions -> keys to store, moved by `storing`."""

    def from_position_free(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Keys saved position-free (states before keys were saved at stream positions) ->
        stored keys, at `positions` [keys] in the stream."""
        return keys


class AlibiScheme(PositionScheme):
    """ALiBi adds a bias from the key's index at attention time: keys carry no position."""

    def to_stored(self, keys: torch.Tensor, storing: object) -> torch.Tensor:
        return keys


class RotaryScheme(PositionScheme):
    """RoPE in the rotate-half layout that transformers uses, full or partial (the first dims).

    A turn by a shift is a rotation by shift times the model's own frequencies, its angles
    worked out in float64, so it is exact whatever the stream position. Scaled variants
    (linear, llama3, yarn) keep their factors in those frequencies and their attention factor
    in the keys and queries the model made, which a rotation leaves alone.
    """

    order_free = True

    def __init__(self, rotary: nn.Module, layer_type: str | None = None) -> None:
        frequencies = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
        frequencies = getattr(rotary, "inv_freq", None) if frequencies is None else frequencies
        if not isinstance(frequencies, torch.Tensor):
            raise UnsupportedModelError(
                f"{type(rotary).__name__} keeps no rotary frequencies (inv_freq) the cache can use"
            )
        self._frequencies = frequencies.detach().double().cpu()
        self._rotary = rotary
        self._layer_type = {"layer_type": layer_type} if layer_type else {}
        self._scale: float | None = None

    @property
    def dims(self) -> int:
        """How many leading dims of a head rotate."""
        return 2 * len(self._frequencies)

    def turning(
        self, shift: Shift, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and sin [dims], or [rows, 1, 1, dims] for a shift per row; None for shift 0."""
        if isinstance(shift, int) and shift == 0:
            return None
        angles = torch.as_tensor(shift, dtype=torch.float64).reshape(-1, 1) * self._frequencies
        angles = torch.cat((angles, angles), dim=-1)
        shape = (-1, 1, 1, self.dims) if isinstance(shift, torch.Tensor) else (self.dims,)
        return tuple(
            t.reshape(shape).to(device=device, dtype=dtype) for t in (angles.cos(), angles.sin())
        )

    def turn(
        self,
        x: torch.Tensor,
        turning: tuple[torch.Tensor, torch.Tensor] | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if turning is None:
            return x
        return _rotate(x, *turning, torch.empty_like(x) if out is None else out)

    def to_stored(self, keys: torch.Tensor, storing: object) -> torch.Tensor:
        """Turned in float32 (only the new keys), so a bf16 key is rounded once, when stored."""
        if storing is None:
            return keys
        return self.turn(keys.float(), storing).to(keys.dtype)

    def from_position_free(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotated to `positions` and scaled by the model's attention factor, as the model
        makes its keys."""
        cos, sin = self.turning(positions, keys.device, torch.float32)
        cos, sin = (t[:, 0, 0][None, None] * self._attention_scale() for t in (cos, sin))
        wide = keys.float()
        return _rotate(wide, cos, sin, torch.empty_like(wide)).to(keys.dtype)

    def _attention_scale(self) -> float:
        """The factor the model's cos and sin carry (yarn's attention factor): its cos at 0."""
        if self._scale is None:
            probe = torch.zeros(1, dtype=torch.float32, device=self._frequencies.device)
            cos, _ = self._rotary(
                probe, position_ids=torch.zeros(1, 1, dtype=torch.long), **self._layer_type
            )
            self._scale = float(cos.reshape(-1)[0])
        return self._scale


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin on the first cos.shape[-1] dims, written into `out`.

    This may run over a whole cache, so it makes no temporaries (rotate_half's), and the
    caller says where the result goes (a reused buffer, see scratch.py).
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


def _rotary(model: nn.Module, layer_type: str) -> PositionScheme:
    rotary = _rotary_module(model)
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
    return RotaryScheme(rotary, layer_type if takes_type else None)


def _alibi(model: nn.Module, layer_type: str) -> PositionScheme:
    return AlibiScheme()


def _falcon(model: nn.Module, layer_type: str) -> PositionScheme:
    """Falcon is ALiBi or RoPE depending on its config."""
    rotary = not model.config.alibi
    return (_rotary if rotary else _alibi)(model, layer_type)


# (model, layer type) -> the scheme of that model's layers of that type
SchemeFactory = Callable[[nn.Module, str], PositionScheme]

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
