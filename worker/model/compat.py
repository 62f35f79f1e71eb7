"""How the installed transformers wants its cache passed to a model's forward.

transformers renamed the forward's `past_key_values` to `cache` (the old name warns on every
call from 5.24 on, and goes in 5.40); older 5.x releases know only `past_key_values`. Asking
the forward's own signature picks the right one for the model and release at hand.
"""

from __future__ import annotations

import inspect
from functools import cache

from torch import nn


@cache
def _cache_keyword(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: nn.Module, cache_object: object) -> dict[str, object]:
    """The keyword argument that hands `cache_object` to `model`'s forward."""
    return {_cache_keyword(type(model)): cache_object}
