"""The state store interface the run loop sees, and an in-memory store.

MemoryStore goes through the same encode/verify/decode path as the persistent stores, so tests
of store semantics run against it too; it also serves runs that need no persistence.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cache_store.codec import check_fingerprint, decode_state, encode_state, read_manifest
from cache_store.state import StreamState


@dataclass(frozen=True)
class SaveReport:
    """What one save cost; blocks_reused is the work the content-addressed blocks saved."""

    bytes_written: int  # new block bytes plus the manifest
    blocks_written: int
    blocks_reused: int
    seconds: float


class StateStore(ABC):
    """Where stream states live; the run loop sees only this interface."""

    @abstractmethod
    def load(self, stream_id: str, expected_fingerprint: str | None = None) -> StreamState | None:
        """The stream's saved state, or None if it has none; raises StateError on a bad state."""

    @abstractmethod
    def save(self, state: StreamState) -> SaveReport:
        """Replace the stream's state; a crash leaves the old state or the new one, whole."""

    @abstractmethod
    def delete(self, stream_id: str) -> bool:
        """Forget the stream's state; False if it had none."""

    @abstractmethod
    def list_streams(self) -> list[str]:
        """Ids of the streams with a saved state, sorted."""

    def close(self) -> None:
        """Release connections or handles; stores without any have nothing to do."""


class MemoryStore(StateStore):
    """Manifests and blocks in dicts; blocks no manifest names are dropped at once."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}
        self.blocks: dict[str, bytes] = {}
        self._refs: dict[str, frozenset[str]] = {}  # stream id -> blocks its manifest names

    def load(self, stream_id: str, expected_fingerprint: str | None = None) -> StreamState | None:
        raw = self.manifests.get(stream_id)
        if raw is None:
            return None
        manifest = read_manifest(raw, stream_id)
        check_fingerprint(manifest, expected_fingerprint)
        blocks = {bid: self.blocks[bid] for bid in manifest.block_ids if bid in self.blocks}
        return decode_state(manifest, blocks, expected_fingerprint)

    def save(self, state: StreamState) -> SaveReport:
        started = time.perf_counter()
        encoded = encode_state(state)
        new = {bid: data for bid, data in encoded.blocks.items() if bid not in self.blocks}
        self.blocks.update(new)
        self.manifests[state.stream_id] = encoded.manifest
        self._refs[state.stream_id] = frozenset(encoded.blocks)
        self._drop_unreferenced()
        return SaveReport(
            bytes_written=sum(map(len, new.values())) + len(encoded.manifest),
            blocks_written=len(new),
            blocks_reused=len(encoded.blocks) - len(new),
            seconds=time.perf_counter() - started,
        )

    def delete(self, stream_id: str) -> bool:
        if self.manifests.pop(stream_id, None) is None:
            return False
        del self._refs[stream_id]
        self._drop_unreferenced()
        return True

    def list_streams(self) -> list[str]:
        return sorted(self.manifests)

    def _drop_unreferenced(self) -> None:
        live = frozenset().union(*self._refs.values())
        for bid in self.blocks.keys() - live:
            del self.blocks[bid]
