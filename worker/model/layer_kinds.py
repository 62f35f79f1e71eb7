"""What each layer of a model keeps in the sink cache and how it places its keys.

Hybrid models mix layer types: Gemma 2 and 3 have sliding-window layers beside full-attention
ones, and Gemma 3's sliding layers rotate with a rotary base of their own. Every layer shares
one slot layout (sinks plus ring) and one set of in-cache positions 0..C-1; a layer's kind
says which rotary tables its keys get, and how far back its queries see. A sliding layer hides
keys more than `window - 1` in-cache positions behind its query, the sinks included, exactly as
the model masks when it runs over the kept tokens at positions 0..C-1 itself.

The kinds are read off the config's `layer_types`. A model without them has one kind; if it
slides every layer (Mistral's `sliding_window`), its cache is limited to that window instead
(see loading.py). A layer type the cache cannot place (chunked or linear attention), or a
rotary scaling whose tables change with the sequence length, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from worker.exceptions import CacheCapacityError, UnsupportedModelError
from worker.model.positions import PositionScheme, SchemeFactory, require_supported

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True, eq=False)
class LayerKind:
    """One type of attention layer: its position scheme, and how far back its queries see."""

    name: str  # the model's own layer type, which its forward keys its masks by
    scheme: PositionScheme
    window: int | None = None  # a sliding layer's query sees keys at most window - 1 behind

    def first_visible(self, length_before: int) -> int:
        """The first in-cache position any query of a forward after `length_before` tokens
        sees: 0 for full attention."""
        if self.window is None:
            return 0
        return max(0, length_before - self.window + 1)


def uniform(scheme: PositionScheme, num_layers: int) -> tuple[LayerKind, ...]:
    """Every layer full attention with one scheme (a model without layer types)."""
    kind = LayerKind(FULL, scheme)
    return (kind,) * num_layers


def layer_kinds(model: nn.Module, capacity: int) -> tuple[LayerKind, ...]:
    """One kind per layer of `model`, for a cache of `capacity` slots; or a refusal."""
    config = model.config
    factory = require_placeable(config)
    limit = position_limit(config)
    if limit is not None and capacity > limit:
        raise CacheCapacityError(
            f"a cache of {capacity} tokens exceeds the {limit} positions for which this model's "
            "longrope tables stay the same (they switch with the sequence length); lower --window"
        )
    types = layer_types(config)
    kinds = {
        name: LayerKind(name, factory(model, name), _window(config, name))
        for name in sorted(set(types))
    }
    return tuple(kinds[name] for name in types)


def layer_types(config: object) -> list[str]:
    """Each layer's attention as the config names it ('full_attention', 'sliding_attention'
    in hybrid models such as Gemma 3); every layer full attention where it names none."""
    return list(getattr(config, "layer_types", None) or [FULL] * config.num_hidden_layers)


def require_placeable(config: object) -> SchemeFactory:
    """The architecture's scheme factory, or a refusal naming why its cache positions cannot
    be placed inside the cache: checked from the config alone, before any weight loads."""
    factory = require_supported(getattr(config, "model_type", None))
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"this {config.model_type} attends both ways (use_bidirectional_attention): a "
            "streaming cache needs a causal model"
        )
    unplaceable = sorted(set(layer_types(config)) - {FULL, SLIDING})
    if unplaceable:
        raise UnsupportedModelError(
            f"this {config.model_type} has layers of type {', '.join(unplaceable)}, whose state "
            "the sink cache cannot place at in-cache positions; use a model of full and "
            "sliding attention layers"
        )
    return factory


def _window(config: object, layer_type: str) -> int | None:
    if layer_type != SLIDING:
        return None
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        raise UnsupportedModelError(
            f"{layer_type} layers without a sliding_window in the config; the config is incomplete"
        )
    return window


def position_limit(config: object) -> int | None:
    """The most positions for which the model's rotary tables do not depend on the sequence
    length, when they do (longrope switches to its long factors past its original length)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    groups = [p for p in parameters.values() if isinstance(p, dict)] or [parameters]
    limits = [
        p.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        for p in groups
        if p.get("rope_type") == "longrope"
    ]
    limits = [limit for limit in limits if isinstance(limit, int)]
    return min(limits) if limits else None


def is_hybrid(kinds: tuple[LayerKind, ...]) -> bool:
    """Whether some layers slide: the model then takes one mask per layer type."""
    return any(kind.window is not None for kind in kinds)
