"""The state store interface the run loop sees, and the shared logic of block stores."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cache_store.codec import Buffer, check_fingerprint, decode_state, encode_state, read_manifest
from cache_store.exceptions import MissingBlocksError
from cache_store.state import Expected, StreamState


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
    def load(
        self, stream_id: str, expected_fingerprint: str | Expected | None = None
    ) -> StreamState | None:
        """The stream's saved state, or None if it has none; raises StateError on a bad state.

        Its tensors are read-only views of what was read: copy them before writing.
        """

    @abstractmethod
    def save(self, state: StreamState) -> SaveReport:
        """Replace the stream's state; a crash leaves the old state or the new one, whole.

        Raises MissingBlocksError, having written nothing, if a block `state.stored` names is
        gone.
        """

    @abstractmethod
    def delete(self, stream_id: str) -> bool:
        """Forget the stream's state; False if it had none."""

    @abstractmethod
    def list_streams(self) -> list[str]:
        """Ids of the streams with a saved state, sorted."""

    def close(self) -> None:
        """Release connections or handles; stores without any have nothing to do."""


class BlockStore(StateStore):
    """Immutable content-addressed blocks plus one manifest per stream.

    Loading and saving are the same for every such store; a subclass only says how to read a
    manifest or a block and how to commit a new manifest with the blocks it needs.
    """

    def load(
        self, stream_id: str, expected_fingerprint: str | Expected | None = None
    ) -> StreamState | None:
        raw = self._read_manifest(stream_id)
        if raw is None:
            return None
        manifest = read_manifest(raw, stream_id)
        check_fingerprint(manifest, expected_fingerprint)
        blocks = {
            bid: data for bid in manifest.block_ids if (data := self._read_block(bid)) is not None
        }
        return decode_state(manifest, blocks, expected_fingerprint, borrow=True)

    def save(self, state: StreamState) -> SaveReport:
        started = time.perf_counter()
        self.check_stored(state)
        encoded = encode_state(state)
        new = {bid: data for bid, data in encoded.blocks.items() if not self._has_block(bid)}
        self._commit(state.stream_id, encoded.manifest, new, encoded.block_ids)
        return SaveReport(
            bytes_written=sum(len(data) for data in new.values()) + len(encoded.manifest),
            blocks_written=len(new),
            blocks_reused=len(encoded.block_ids) - len(new),
            seconds=time.perf_counter() - started,
        )

    def check_stored(self, state: StreamState) -> None:
        """MissingBlocksError if a block that `state` names without carrying it is gone."""
        carried = state.tensors.keys()
        gone = sorted(
            ref.block
            for name, ref in state.stored.items()
            if name not in carried and not self._has_block(ref.block)
        )
        if gone:
            raise MissingBlocksError(
                f"the state of stream {state.stream_id!r} names blocks this store no longer "
                f"holds ({', '.join(gone[:3])}); save the stream whole"
            )

    @abstractmethod
    def _read_manifest(self, stream_id: str) -> bytes | None: ...

    @abstractmethod
    def _read_block(self, block_id: str) -> bytes | None: ...

    @abstractmethod
    def _has_block(self, block_id: str) -> bool: ...

    @abstractmethod
    def _commit(
        self, stream_id: str, manifest: bytes, new_blocks: dict[str, Buffer], names: frozenset[str]
    ) -> None:
        """Store `new_blocks`, then make `manifest` (naming the blocks `names`) current."""
