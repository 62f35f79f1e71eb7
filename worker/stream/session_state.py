"""A session to and from its saved state, exactly.

The cache exports and loads its own tensors (see SinkCache.export); a state adds the session's
counters, its kind, and the prompt the stream was started with, which a restore must match.

A state also records what it was written with (dtype, rope, layer types, cache size: see
worker/model/cache_identity.py), and a restore refuses on any difference, naming the field.
States saved before those were recorded still restore: a user who upgrades streamsink expects
their streams to go on, and nothing is lost by it, since the model fingerprint they were
checked against hashes the config and the dtype, and their cache size is checked from their
layout below.
"""

from __future__ import annotations

from cache_store.codec import check_fingerprint
from cache_store.exceptions import StateForeignError
from cache_store.state import Expected, StreamState
from worker.model.cache_identity import cache_identity
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
    writer = expected_writer(commentator)
    return StreamState(session.stream_id, writer.fingerprint, tensors, meta, writer.written_with)


def expected_writer(commentator: Commentator) -> Expected:
    """What a state must have been written with for this commentator to restore it; a store
    checks it before it fetches any block."""
    return Expected(
        commentator.loaded.fingerprint,
        cache_identity(commentator.loaded.model, commentator.settings),
        fix="run with the --model, --device, --sinks and --window that wrote it",
    )


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
