"""What differs between the transformers releases pyproject allows, in one place.

transformers renamed the forward's `past_key_values` to `cache` (the old name warns on every
call from 5.24 on, and goes in 5.40); older 5.x releases know only `past_key_values`. Asking
the forward's own signature picks the right one for the model and release at hand.

A cache layer's interface moved too: before 5.4 the masks asked `get_mask_sizes` with the
step's cache positions (a tensor) instead of its query length, and before 5.14 the largest
length was `get_max_cache_shape`, not `get_max_length`. `LayerAcrossReleases` answers both.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import nn


@cache
def _cache_keyword(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: nn.Module, cache_object: object) -> dict[str, object]:
    """The keyword argument that hands `cache_object` to `model`'s forward."""
    return {_cache_keyword(type(model)): cache_object}


class LayerAcrossReleases:
    """The cache-layer methods whose names or arguments changed within transformers 5.x.

    A layer implements `mask_sizes(query_length)` and `get_max_length()`; this mixin gives
    every release the spelling it calls.
    """

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        """(key length, key offset) for a query of `query` tokens, or of these positions."""
        return self.mask_sizes(query if isinstance(query, int) else query.shape[0])

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()
