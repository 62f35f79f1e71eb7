"""A session to and from its saved state, exactly.

The cache snapshots and loads its own tensors (see SinkCache.snapshot); a state adds the
session's counters, its kind, and the prompt the stream was started with, which a restore must
match. A snapshot carries only the cache pieces changed since the last committed one and names
the others by their blocks; `mark_saved` once its commit succeeded, `forget_stored` if the
store lost those blocks.

A state also records what it was written with (dtype, rope, layer types, cache size: see
worker/model/cache_identity.py), and a restore refuses on any difference, naming the field.
States saved before those were recorded still restore: a user who upgrades streamsink expects
their streams to go on, and nothing is lost by it, since the model fingerprint they were
checked against hashes the config and the dtype, and their cache size is checked from their
layout below.
"""

from __future__ import annotations

from typing import get_args, get_origin, get_type_hints

import torch

from cache_store.codec import check_fingerprint, tensor_ref
from cache_store.exceptions import StateCorruptError, StateForeignError
from cache_store.state import Expected, StreamState
from worker.model.cache_identity import cache_identity
from worker.stream.commentator import Commentator
from worker.stream.session import SessionCounters, StreamSession

STATE_KIND = "streamsink.session/1"


def snapshot(session: StreamSession, commentator: Commentator) -> StreamState:
    cache = session.unsaved = session.cache.snapshot()
    tensors, cache_meta = cache.tensors, cache.meta
    meta = {
        "kind": STATE_KIND,
        **cache_meta,  # layout, layers, how the keys are turned
        "counters": session.counters.to_meta(),
        "instruction": commentator.prompt.instruction,
        "request": commentator.prompt.request,
    }
    writer = expected_writer(commentator)
    stored = {name: session.stored[name] for name in cache.kept}
    return StreamState(
        session.stream_id, writer.fingerprint, tensors, meta, writer.written_with, stored
    )


def expected_writer(commentator: Commentator) -> Expected:
    """What a state must have been written with for this commentator to restore it; a store
    checks it before it fetches any block."""
    return Expected(
        commentator.loaded.fingerprint,
        cache_identity(commentator.loaded.model, commentator.settings),
        fix="run with the --model, --device, --sinks and --window that wrote it",
    )


def mark_saved(session: StreamSession) -> None:
    """The last snapshot was committed: the next one names its pieces by their blocks."""
    cache, session.unsaved = session.unsaved, None
    if cache is None:
        return
    session.cache.saved(cache)
    kept = {name: session.stored[name] for name in cache.kept}
    new = cache.plan.new if cache.plan is not None else ()
    session.stored = kept | {piece.name: tensor_ref(cache.tensors[piece.name]) for piece in new}


def forget_stored(session: StreamSession) -> None:
    """The store may have lost the saved pieces: the next snapshot carries every slot."""
    session.cache.pieces.forget()
    session.stored, session.unsaved = {}, None


def restore(state: StreamState, commentator: Commentator) -> StreamSession:
    """A session that continues exactly where the saved one stopped, with no prefill.

    A state the codec accepted can still be one that does not fit (written by a bug, or by
    hand): whatever in it does not fit this cache is a StateCorruptError, never an error that
    would stop the worker, here or at the stream's next forward.
    """
    try:
        _check_compatible(state, commentator)
        session = commentator.new_empty_session(state.stream_id)
        session.cache.load(state.tensors, state.meta)
        session.stored = dict(state.stored)
        session.counters = _counters(state.meta["counters"], commentator)
        _check_loaded(session, commentator)
    except (LookupError, TypeError, ValueError, RuntimeError) as error:
        raise StateCorruptError(
            f"state of stream {state.stream_id!r} does not fit this cache ({error}); delete the "
            "stream's state so the stream starts fresh"
        ) from error
    return session


def _counters(saved: object, commentator: Commentator) -> SessionCounters:
    """The saved counters, each of its own type; their tokens inside the vocabulary."""
    counters = SessionCounters.from_meta(dict(saved))  # TypeError on a missing or extra field
    for name, kind in get_type_hints(SessionCounters).items():
        value = getattr(counters, name)
        if not _is_of(value, kind):
            raise TypeError(f"counter {name!r} is {value!r}")
    vocabulary = commentator.loaded.model.get_input_embeddings().num_embeddings
    tokens = [*counters.pending, *(t for opening in counters.commentary_openings for t in opening)]
    if not all(0 <= token < vocabulary for token in tokens):
        raise ValueError("a pending or remembered token is outside the vocabulary")
    return counters


def _is_of(value: object, kind: object) -> bool:
    """Whether a plain value is of an annotation: int (not bool), bool, float | None, and lists
    of those (list[int], list[list[int]])."""
    if get_origin(kind) is list:
        [item_kind] = get_args(kind)
        return type(value) is list and all(_is_of(item, item_kind) for item in value)
    return type(value) in (get_args(kind) or (kind,)) or (kind is float and type(value) is int)


def _check_loaded(session: StreamSession, commentator: Commentator) -> None:
    """The loaded tensors are the ones this cache runs: token ids, and keys and values in the
    model's dtype with a slot for each position, of one shape in every layer (the model's own
    head shape is known only to its forward)."""
    cache, capacity = session.cache, session.cache.layout.capacity
    if cache.token_ids.dtype != torch.long or tuple(cache.token_ids.shape) != (capacity,):
        raise ValueError(f"its token ids are {cache.token_ids.dtype} {list(cache.token_ids.shape)}")
    shapes = set()
    for index, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            continue
        for kind, tensor in (("keys", layer.keys), ("values", layer.values)):
            if tensor.dtype != commentator.loaded.dtype or tensor.dim() != 4:
                raise ValueError(f"layer {index}'s {kind} are {tensor.dtype} {list(tensor.shape)}")
            if tensor.shape[2] != capacity:
                raise ValueError(f"layer {index}'s {kind} have {tensor.shape[2]} slots")
            shapes.add((kind, tuple(tensor.shape)))
    if len(shapes) > 2:
        raise ValueError(f"its layers differ in shape: {sorted(shapes)}")


def _check_compatible(state: StreamState, commentator: Commentator) -> None:
    meta = state.meta
    if meta.get("kind") != STATE_KIND:
        raise StateForeignError(
            f"state of stream {state.stream_id!r} is of kind {meta.get('kind')!r}, not "
            f"{STATE_KIND!r}; evict it or use the streamsink version that wrote it"
        )
    check_fingerprint(state, expected_writer(commentator))
    layout = meta["layout"]  # where a state saved before `written_with` has its cache size
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
