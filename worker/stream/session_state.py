"""A session to and from its saved state, exactly.

Each layer's keys and values are cut into blocks of `BLOCK_SLOTS` slots. Between two snapshots
only the slots that new tokens went into change, so a content-addressed store writes only a few
blocks per snapshot; the rest are already there.
"""

from __future__ import annotations

import torch

from cache_store.exceptions import StateForeignError
from cache_store.state import StreamState
from worker.model.slot_layout import SlotLayout
from worker.stream.commentator import Commentator
from worker.stream.session import SessionCounters, StreamSession

BLOCK_SLOTS = 64
STATE_KIND = "streamsink.session/1"


def snapshot(session: StreamSession, commentator: Commentator) -> StreamState:
    cache = session.cache
    tensors: dict[str, torch.Tensor] = {"token_ids": cache.token_ids.cpu().clone()}
    for index, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            continue
        for kind, buffer in (("keys", layer.keys), ("values", layer.values)):
            for block, start in enumerate(range(0, buffer.shape[2], BLOCK_SLOTS)):
                piece = buffer[:, :, start : start + BLOCK_SLOTS]
                tensors[f"layer{index}.{kind}.{block}"] = piece.detach().cpu().contiguous()
    meta = {
        "kind": STATE_KIND,
        "layout": cache.layout.to_meta(),
        "counters": session.counters.to_meta(),
        "instruction": commentator.prompt.instruction,
        "request": commentator.prompt.request,
        "layers": sum(layer.is_initialized for layer in cache.layers),
    }
    return StreamState(session.stream_id, commentator.loaded.fingerprint, tensors, meta)


def restore(state: StreamState, commentator: Commentator) -> StreamSession:
    """A session that continues exactly where the saved one stopped, with no prefill."""
    meta = state.meta
    _check_compatible(state, commentator)
    session = commentator.new_empty_session(state.stream_id)
    cache = session.cache
    saved_layout = SlotLayout.from_meta(meta["layout"])
    cache.layout = saved_layout
    cache.token_ids = state.tensors["token_ids"].to(cache.device, copy=True)
    device = commentator.loaded.device
    for index, layer in enumerate(cache.layers[: meta["layers"]]):
        keys, values = (
            _join(state, f"layer{index}.{kind}").to(device) for kind in ("keys", "values")
        )
        layer.keys, layer.values = keys, values
        layer.dtype, layer.device = keys.dtype, keys.device
        layer.is_initialized = True
        layer.length = saved_layout.length
    session.counters = SessionCounters.from_meta(dict(meta["counters"]))
    return session


def _join(state: StreamState, prefix: str) -> torch.Tensor:
    blocks = sorted(
        (int(name.rsplit(".", 1)[1]), tensor)
        for name, tensor in state.tensors.items()
        if name.rsplit(".", 1)[0] == prefix
    )
    return torch.cat([tensor for _, tensor in blocks], dim=2)


def _check_compatible(state: StreamState, commentator: Commentator) -> None:
    meta = state.meta
    if meta.get("kind") != STATE_KIND:
        raise StateForeignError(
            f"state of stream {state.stream_id!r} is of kind {meta.get('kind')!r}, not "
            f"{STATE_KIND!r}; evict it or use the streamsink version that wrote it"
        )
    layout = meta["layout"]
    settings = commentator.settings
    if (layout["capacity"], layout["sinks"]) != (settings.capacity, settings.sinks):
        raise StateForeignError(
            f"state of stream {state.stream_id!r} was saved with sinks={layout['sinks']} and a "
            f"cache of {layout['capacity']} tokens, but this run uses sinks={settings.sinks} and "
            f"{settings.capacity}; run with the same --sinks/--window or evict the stream"
        )
    prompt = commentator.prompt
    if (meta["instruction"], meta["request"]) != (prompt.instruction, prompt.request):
        raise StateForeignError(
            f"state of stream {state.stream_id!r} was started with another instruction or "
            "request; run with the same --instruction and --request or evict the stream"
        )
