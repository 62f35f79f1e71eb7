"""Which slots a snapshot of a sink cache must carry, and which saved pieces it can name instead.

A piece holds slots start..stop-1 of every layer's keys and values, as they were in one
snapshot. The cache counts its writes (a generation per forward) and the generation of each
slot's last write, so a snapshot carries one new piece per run of slots written since the last
saved snapshot, and names the saved pieces of the other slots by their blocks: it costs what
changed, not the cache size. Pieces never cross a cell boundary (CELL_SLOTS); a restore lays
them down oldest first, so a newer piece overrides what an older one held of the same slots.
An older piece whose every slot newer pieces hold is dropped, and a cell that would keep more
than MAX_PIECES_PER_CELL pieces is carried whole, as one piece: that bounds the manifest.

Pure bookkeeping on the host (no tensors of keys), so it is tested on its own; a snapshot
counts only once its commit succeeded (`saved`), so a failed commit leaves every slot it
should have carried to the next snapshot.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Measured over 4 ring turns of checkpoints every 16 tokens (and every 1-200) at C = 256 to
# 4096: cells of 16-64 slots write exactly the changed KV plus the manifest; cells of 64 keep
# the smallest manifest of those (28 KB at 4096 against 45 KB for 16); 128 and 256 crowd past
# MAX_PIECES_PER_CELL with 16-token checkpoints and rewrite whole cells (8-16x at worst).
CELL_SLOTS = 64
MAX_PIECES_PER_CELL = 8
_NAME = re.compile(r"kv\.(\d+)\.(\d+)\.(\d+)\Z")


@dataclass(frozen=True, order=True)
class Piece:
    """Slots start..stop-1 as of the snapshot at `generation`; sorts in lay-down order."""

    generation: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"kv.{self.generation}.{self.start}.{self.stop}"

    @classmethod
    def parse(cls, name: str) -> Piece | None:
        """The piece a saved tensor's name describes, or None for a name of another kind."""
        match = _NAME.match(name)
        return None if match is None else cls(*(int(group) for group in match.groups()))


@dataclass(frozen=True)
class SnapshotPlan:
    """What one snapshot carries (`new`, to be copied) and names by its saved block (`kept`)."""

    generation: int
    new: tuple[Piece, ...]
    kept: tuple[Piece, ...]


class PieceTracker:
    """Slot writes since the last saved snapshot, and the pieces that snapshot is made of."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.generation = 0
        self._written = np.zeros(capacity, dtype=np.int64)  # generation of each slot's write
        self._saved_generation = -1  # nothing saved yet: every slot counts as written
        self._cells: dict[int, list[Piece]] = {}  # saved pieces per cell, in lay-down order

    def wrote(self, runs: Iterable[tuple[int, int]]) -> None:
        """A forward wrote slots a..b-1 of each run (a, b)."""
        self.generation += 1
        for start, stop in runs:
            self._written[start:stop] = self.generation

    def plan(self) -> SnapshotPlan:
        """The pieces a snapshot taken now carries and names; changes nothing."""
        dirty = self._written > self._saved_generation
        touched = set((np.flatnonzero(dirty) // CELL_SLOTS).tolist())
        new: list[Piece] = []
        kept: list[Piece] = []
        for cell in range(0, self.capacity, CELL_SLOTS):
            saved = self._cells.get(cell, [])
            if cell // CELL_SLOTS not in touched:
                kept += saved
                continue
            cell_dirty = dirty[cell : cell + CELL_SLOTS]
            fresh = [Piece(self.generation, cell + a, cell + b) for a, b in _runs(cell_dirty)]
            survivors = _not_covered(saved, cell_dirty, cell)
            if len(survivors) + len(fresh) > MAX_PIECES_PER_CELL:
                survivors = []
                fresh = [Piece(self.generation, cell, min(cell + CELL_SLOTS, self.capacity))]
            kept += survivors
            new += fresh
        return SnapshotPlan(self.generation, tuple(new), tuple(kept))

    def saved(self, plan: SnapshotPlan) -> None:
        """`plan`'s snapshot was committed: later ones carry only slots written after it."""
        self._saved_generation = plan.generation
        self._cells = _by_cell(plan.kept + plan.new)

    def restored(self, pieces: Iterable[Piece]) -> None:
        """The cache was loaded from a state made of `pieces`: nothing is unsaved."""
        ordered = sorted(pieces)
        self._written[:] = 0
        if not ordered:
            self.forget()
            return
        self._cells = _by_cell(ordered)
        self.generation = self._saved_generation = ordered[-1].generation

    def forget(self) -> None:
        """The saved pieces cannot be named any more: the next snapshot carries every slot."""
        self._saved_generation = -1
        self._cells = {}


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def _not_covered(saved: list[Piece], dirty: np.ndarray, cell: int) -> list[Piece]:
    """The saved pieces of a cell that still hold a slot no newer piece holds, in order."""
    covered = dirty.copy()
    survivors = []
    for piece in reversed(saved):
        span = covered[piece.start - cell : piece.stop - cell]
        if not span.all():
            survivors.append(piece)
            span[:] = True
    return survivors[::-1]


def _by_cell(pieces: Iterable[Piece]) -> dict[int, list[Piece]]:
    cells: dict[int, list[Piece]] = {}
    for piece in pieces:
        cells.setdefault(piece.start - piece.start % CELL_SLOTS, []).append(piece)
    return cells
