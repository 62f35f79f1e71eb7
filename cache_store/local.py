"""A state store in a local directory: content-addressed blocks plus one manifest per stream.

root/blocks/<id[:2]>/<id> holds immutable blocks, written once; root/streams/<quoted stream
id>.manifest names each stream's current state. Every file is written to a temporary name
beside its final one, fsynced, and renamed into place, and blocks are durable before the
manifest that names them, so a crash leaves the old state or the new one, never a torn one.
One process writes a root at a time: garbage collection assumes no concurrent save.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote, unquote

from cache_store.codec import Buffer, read_manifest
from cache_store.exceptions import StateError
from cache_store.store import BlockStore

MANIFEST_SUFFIX = ".manifest"
TEMP_SUFFIX = ".tmp"  # never ends a manifest name, so leftovers of a crash are not streams
_NAME_MAX = 255  # bytes in one file name on common Linux file systems

log = logging.getLogger(__name__)


class LocalDirStore(BlockStore):
    """Stream states under `root`; unreferenced blocks are collected every `gc_every` changes."""

    def __init__(self, root: Path | str, gc_every: int = 64) -> None:
        if gc_every < 1:
            raise ValueError(f"gc_every must be at least 1, got {gc_every}")
        self.root = Path(root)
        self.gc_every = gc_every
        self._blocks = self.root / "blocks"
        self._streams = self.root / "streams"
        self._blocks.mkdir(parents=True, exist_ok=True)
        self._streams.mkdir(parents=True, exist_ok=True)
        self._changes = 0

    def _read_manifest(self, stream_id: str) -> bytes | None:
        try:
            return self._manifest_path(stream_id).read_bytes()
        except FileNotFoundError:
            return None

    def _commit(
        self, stream_id: str, manifest: bytes, new_blocks: dict[str, Buffer], names: frozenset[str]
    ) -> None:
        self._write_blocks(new_blocks)
        _write_durably(self._manifest_path(stream_id), manifest)
        _fsync_dir(self._streams)
        self._count_change()

    def delete(self, stream_id: str) -> bool:
        try:
            self._manifest_path(stream_id).unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(self._streams)
        self._count_change()
        return True

    def list_streams(self) -> list[str]:
        return sorted(unquote(name.removesuffix(MANIFEST_SUFFIX)) for name in self._manifests())

    def collect_garbage(self) -> int:
        """Remove blocks no manifest names, and temp files a crash left; return blocks removed.

        Raises StateError if a manifest cannot be read: the blocks it needs are unknown then,
        so nothing is removed.
        """
        live: set[str] = set()
        for name in self._manifests():
            stream_id = unquote(name.removesuffix(MANIFEST_SUFFIX))
            live |= read_manifest((self._streams / name).read_bytes(), stream_id).block_ids
        removed = 0
        for path in _files(self._blocks.iterdir()):
            if path.name.endswith(TEMP_SUFFIX):
                path.unlink(missing_ok=True)
            elif path.name not in live:
                path.unlink()
                removed += 1
        for path in self._streams.glob("*" + TEMP_SUFFIX):
            path.unlink(missing_ok=True)
        return removed

    def _count_change(self) -> None:
        """Collect garbage every gc_every changes; another stream's bad state must not fail it."""
        self._changes += 1
        if self._changes % self.gc_every:
            return
        try:
            self.collect_garbage()
        except StateError as error:
            log.warning("state garbage collection skipped: %s", error)

    def _write_blocks(self, blocks: Mapping[str, Buffer]) -> None:
        """Write new blocks and make them durable before any manifest can name them."""
        dirs: set[Path] = set()
        for bid, data in blocks.items():
            path = self._block_path(bid)
            if not path.parent.exists():
                path.parent.mkdir()
                dirs.add(self._blocks)
            _write_durably(path, data)
            dirs.add(path.parent)
        for directory in dirs:
            _fsync_dir(directory)

    def _manifests(self) -> list[str]:
        names = (path.name for path in self._streams.iterdir())
        return [name for name in names if name.endswith(MANIFEST_SUFFIX)]

    def _manifest_path(self, stream_id: str) -> Path:
        name = quote(stream_id, safe="") + MANIFEST_SUFFIX
        if len(name) > _NAME_MAX:
            raise ValueError(
                f"stream id {stream_id[:40]!r}... is too long for a dir: state store (its file "
                f"name would be {len(name)} bytes, the limit is {_NAME_MAX}); use shorter ids"
            )
        return self._streams / name

    def _block_path(self, block_id: str) -> Path:
        return self._blocks / block_id[:2] / block_id

    def _has_block(self, block_id: str) -> bool:
        return self._block_path(block_id).exists()

    def _read_block(self, block_id: str) -> bytes | None:
        try:
            return self._block_path(block_id).read_bytes()
        except FileNotFoundError:
            return None


def _files(directories: Iterable[Path]) -> list[Path]:
    return [path for directory in directories if directory.is_dir() for path in directory.iterdir()]


def _write_durably(path: Path, data: Buffer) -> None:
    """Write under a temporary name, fsync, then rename: readers see all of `data` or none."""
    fd, temporary = tempfile.mkstemp(prefix=".", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
