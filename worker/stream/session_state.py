"""A session to and from its saved state, exactly.

The cache exports and loads its own tensors (see SinkCache.export); a state adds the session's
counters, its kind, and the prompt the stream was started with, which a restore must match.
"""

from __future__ import annotations

from cache_store.exceptions import StateForeignError
from cache_store.state import StreamState
from worker.stream.commentator import Commentator
from worker.stream.session import SessionCounters, StreamSession

STATE_KIND = "streamsink.session/1"


def snapshot(session: StreamSession, commentator: Commentator) -> StreamState:
    tensors, cache_meta = session.cache.export()
    meta = {
        "kind": STATE_KIND,
        "layout": cache_meta["layout"],
        "counters": session.counters.to_meta(),
        "instruction": commentator.prompt.instruction,
        "request": commentator.prompt.request,
        "layers": cache_meta["layers"],
    }
    return StreamState(session.stream_id, commentator.loaded.fingerprint, tensors, meta)


def restore(state: StreamState, commentator: Commentator) -> StreamSession:
    """A session that continues exactly where the saved one stopped, with no prefill."""
    _check_compatible(state, commentator)
    session = commentator.new_empty_session(state.stream_id)
    session.cache.load(state.tensors, state.meta)
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
