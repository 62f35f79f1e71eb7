"""One stream's saved state as a single file, to move it between stores or keep a copy.

The file is msgpack: {kind, scope, manifest, blocks}; the manifest and blocks are exactly the
stored ones, so an import verifies every checksum before anything is written.
"""

from __future__ import annotations

import msgpack

from cache_store.codec import decode_state, encode_state, read_manifest
from cache_store.exceptions import StateCorruptError
from cache_store.state import StreamState

EXPORT_KIND = "streamsink.export/1"


def export_state(state: StreamState, scope: str) -> bytes:
    encoded = encode_state(state)
    return msgpack.packb(
        {
            "kind": EXPORT_KIND,
            "scope": scope,
            "manifest": encoded.manifest,
            "blocks": encoded.blocks,
        }
    )


def import_state(raw: bytes) -> tuple[StreamState, str]:
    """The state and the scope it was exported from; StateError if the file is not whole."""
    try:
        data = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as error:
        raise StateCorruptError(f"not a streamsink export: {error}") from error
    if type(data) is not dict or data.get("kind") != EXPORT_KIND:
        raise StateCorruptError(f"not a streamsink export (expected kind {EXPORT_KIND!r})")
    scope, manifest, blocks = data.get("scope"), data.get("manifest"), data.get("blocks")
    if type(scope) is not str or type(manifest) is not bytes or type(blocks) is not dict:
        raise StateCorruptError("the streamsink export is damaged: no scope, manifest or blocks")
    if any(type(block) is not bytes for block in blocks.values()):
        raise StateCorruptError("the streamsink export is damaged: a block is not bytes")
    return decode_state(read_manifest(manifest), blocks), scope
