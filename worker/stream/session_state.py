"""A session to and from its saved state, exactly.

The cache snapshots and loads its own tensors (see SinkCache.snapshot); a state adds the
session's counters, its kind, and the prompt the stream was started with, which a restore must
match. A snapshot carries only the cache pieces changed since the last committed one and names
the others by their blocks; `mark_saved` once its commit succeeded, `forget_stored` if the
store lost those blocks.
"""

from __future__ import annotations

from cache_store.codec import tensor_ref
from cache_store.exceptions import StateForeignError
from cache_store.state import StreamState
from worker.stream.commentator import Commentator
from worker.stream.session import SessionCounters, StreamSession

STATE_KIND = "streamsink.session/1"


def snapshot(session: StreamSession, commentator: Commentator) -> StreamState:
    cache = session.unsaved = session.cache.snapshot()
    tensors, cache_meta = cache.tensors, cache.meta
    meta = {
        "kind": STATE_KIND,
        "layout": cache_meta["layout"],
        "counters": session.counters.to_meta(),
        "instruction": commentator.prompt.instruction,
        "request": commentator.prompt.request,
        "layers": cache_meta["layers"],
    }
    stored = {name: session.stored[name] for name in cache.kept}
    return StreamState(session.stream_id, commentator.loaded.fingerprint, tensors, meta, stored)


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
    """A session that continues exactly where the saved one stopped, with no prefill."""
    _check_compatible(state, commentator)
    session = commentator.new_empty_session(state.stream_id)
    session.cache.load(state.tensors, state.meta)
    session.stored = dict(state.stored)
    session.counters = SessionCounters.from_meta(dict(state.meta["counters"]))
    return session


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
