"""An in-memory store: states kept in dicts, lost when the process ends.

MemoryStore goes through the same encode/verify/decode path as the persistent stores, so tests
of store semantics run against it too; it also serves runs that need no persistence.
"""

from __future__ import annotations

from cache_store.codec import Buffer
from cache_store.store import BlockStore


class MemoryStore(BlockStore):
    """Manifests and blocks in dicts; blocks no manifest names are dropped at once."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.blocks: dict[str, bytes] = {}
        self._refs: dict[str, frozenset[str]] = {}  # stream id -> blocks its manifest names

    def delete(self, stream_id: str) -> bool:
        if self.manifests.pop(stream_id, None) is None:
            return False
        del self._refs[stream_id]
        self._drop_unreferenced()
        return True

    def list_streams(self) -> list[str]:
        return sorted(self.manifests)

    def _read_manifest(self, stream_id: str) -> bytes | None:
        return self.manifests.get(stream_id)

    def _read_block(self, block_id: str) -> bytes | None:
        return self.blocks.get(block_id)

    def _has_block(self, block_id: str) -> bool:
        return block_id in self.blocks

    def _commit(
        self, stream_id: str, manifest: bytes, new_blocks: dict[str, Buffer], names: frozenset[str]
    ) -> None:
        self.blocks.update((bid, bytes(data)) for bid, data in new_blocks.items())
        self.manifests[stream_id] = manifest
        self._refs[stream_id] = names
        self._drop_unreferenced()

    def _drop_unreferenced(self) -> None:
        live = frozenset().union(*self._refs.values())
        for bid in self.blocks.keys() - live:
            del self.blocks[bid]
