"""Buffers a forward reuses for its per-layer intermediates, so they are not allocated anew.

Every layer of a single cache's forward makes a tensor as large as the cache: its window's keys
turned back to their in-cache positions (sink_cache.py). Made anew each layer, such a
tensor costs more than the work that fills it on the CPU (fresh pages are faulted in, and
zeroed, on every call). So each thread keeps one buffer per purpose, grown when a larger one is
asked for, and hands out views of it. A view is valid until its purpose is asked for again, in
the next layer: long enough for that layer's attention, which is all it is for.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

_local = threading.local()


def scratch(
    purpose: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A contiguous tensor of `shape`, its contents undefined, reused by the next call of the
    same purpose (in this thread, dtype, device and inference mode)."""
    buffers: dict[tuple[object, ...], torch.Tensor] = _local.__dict__.setdefault("buffers", {})
    # An inference tensor cannot be written outside inference mode: keep one of each.
    key = (purpose, dtype, torch.device(device), torch.is_inference_mode_enabled())
    size = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[key] = torch.empty(size, dtype=dtype, device=device)
    return buffer[:size].view(shape)
