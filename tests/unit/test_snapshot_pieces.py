"""Which slots a snapshot carries and which saved pieces it names: pure bookkeeping, no tensors."""

from __future__ import annotations

from worker.model.slot_layout import SlotLayout
from worker.model.snapshot_pieces import CELL_SLOTS, MAX_PIECES_PER_CELL, Piece, PieceTracker

CAPACITY = 2 * CELL_SLOTS + 8


def _saved_tracker() -> PieceTracker:
    tracker = PieceTracker(CAPACITY)
    tracker.wrote([(0, CAPACITY)])
    tracker.saved(tracker.plan())
    return tracker


def test_a_first_snapshot_carries_every_cell_whole() -> None:
    tracker = PieceTracker(CAPACITY)
    plan = tracker.plan()
    cells = [(0, CELL_SLOTS), (CELL_SLOTS, 2 * CELL_SLOTS), (2 * CELL_SLOTS, CAPACITY)]
    assert plan.new == tuple(Piece(0, start, stop) for start, stop in cells)
    assert plan.kept == ()


def test_only_the_runs_written_since_the_saved_snapshot_are_carried() -> None:
    tracker = _saved_tracker()
    tracker.wrote([(CELL_SLOTS - 2, CELL_SLOTS + 3)])  # across a cell boundary
    plan = tracker.plan()
    generation = tracker.generation
    assert plan.new == (Piece(generation, CELL_SLOTS - 2, CELL_SLOTS), Piece(generation, 64, 67))
    assert len(plan.kept) == 3  # every saved cell still holds slots no new piece holds


def test_a_failed_commit_leaves_its_slots_to_the_next_snapshot() -> None:
    tracker = _saved_tracker()
    tracker.wrote([(3, 5)])
    tracker.plan()  # taken, never saved: its commit failed
    tracker.wrote([(9, 10)])
    assert [(p.start, p.stop) for p in tracker.plan().new] == [(3, 5), (9, 10)]


def test_writes_after_a_snapshot_stay_unsaved_once_it_is_saved() -> None:
    tracker = _saved_tracker()
    tracker.wrote([(3, 5)])
    plan = tracker.plan()
    tracker.wrote([(7, 8)])  # the cache went on while the commit ran
    tracker.saved(plan)
    assert [(p.start, p.stop) for p in tracker.plan().new] == [(7, 8)]


def test_a_piece_newer_pieces_cover_is_dropped_and_a_crowded_cell_is_carried_whole() -> None:
    tracker = _saved_tracker()
    for slot in range(MAX_PIECES_PER_CELL - 1):
        tracker.wrote([(slot, slot + 1)])
        plan = tracker.plan()
        tracker.saved(plan)
        if slot == 0:
            (first_slot,) = plan.new
    in_first_cell = [p for p in plan.kept + plan.new if p.start < CELL_SLOTS]
    assert len(in_first_cell) == MAX_PIECES_PER_CELL  # the whole cell, then 7 single slots
    tracker.wrote([(0, 1)])  # covers the piece of slot 0, which is dropped: no crowding
    plan = tracker.plan()
    assert first_slot not in plan.kept and plan.new == (Piece(tracker.generation, 0, 1),)
    tracker.saved(plan)
    tracker.wrote([(20, 21)])  # a ninth piece: the cell is carried whole instead
    assert tracker.plan().new == (Piece(tracker.generation, 0, CELL_SLOTS),)


def test_a_restored_tracker_carries_nothing_until_written() -> None:
    saved = _saved_tracker().plan().kept
    tracker = PieceTracker(CAPACITY)
    tracker.restored(saved)
    assert tracker.plan().new == ()
    tracker.wrote([(5, 6)])
    assert tracker.plan().new == (Piece(tracker.generation, 5, 6),)
    assert tracker.generation > max(piece.generation for piece in saved)  # names stay unique


def test_slot_runs_follow_the_ring_and_wrap_at_its_end() -> None:
    layout = SlotLayout(16, 4)
    assert layout.slot_runs(2, 5) == [(2, 4), (4, 7)]
    layout.ring_start = 10  # positions 4.. live from slot 14 on, then wrap to slot 4
    assert layout.slot_runs(6, 5) == [(4, 9)]
    assert layout.slot_runs(4, 5) == [(14, 16), (4, 7)]
