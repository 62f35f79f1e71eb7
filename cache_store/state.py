"""The unit a store saves and restores: one stream's complete resumable state."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


# eq=False: field-wise == would compare tensors element-wise and fail; compare what you need.
@dataclass(frozen=True, eq=False)
class StreamState:
    """Everything needed to resume one stream exactly."""

    stream_id: str
    fingerprint: str  # model fingerprint (opaque hex string)
    tensors: Mapping[str, torch.Tensor]  # named CPU tensors, any shape and supported dtype
    meta: Mapping[str, Any]  # plain data: None, bool, int, float, str, bytes, list, str-keyed dict
