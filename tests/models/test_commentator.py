"""The commentator and session state on a tiny random model with a byte tokenizer."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from cache_store.exceptions import StateCorruptError, StateForeignError
from cache_store.local import LocalDirStore
from cache_store.memory import MemoryStore
from tests.cache_probes import kept_token_ids
from tests.models.tiny_models import tiny_loaded, tiny_variant
from worker.exceptions import CacheCapacityError
from worker.model.cache_settings import CacheSettings
from worker.stream.chat_format import Prompt
from worker.stream.commentator import Commentator, StreamInput
from worker.stream.policy import CommentaryPolicy
from worker.stream.session_state import expected_writer, restore, snapshot

LINES = [
    f"12:00:{i:02d} {'ERROR' if i % 5 == 0 else 'INFO'} request {i} took {i * 7}ms"
    for i in range(40)
]
SETTINGS = CacheSettings(sinks=4, window=124, max_chunk=32)
POLICY = CommentaryPolicy(every_records=5, max_new_tokens=6)
# A window that holds a few turns, so the earlier commentary is still there to look back on.
WIDE = CacheSettings(sinks=4, window=400, max_chunk=32)
CONTROLLED = CommentaryPolicy(
    every_records=2, max_new_tokens=6, repetition_penalty=1.5, no_repeat_ngram=2
)


def _commentator(name: str = "llama", seed: int = 0, **overrides) -> Commentator:
    return Commentator(
        overrides.get("loaded") or tiny_loaded(name, seed),
        overrides.get("settings", SETTINGS),
        overrides.get("policy", POLICY),
        Prompt(instruction="Comment on the log."),
    )


def _feed(commentator: Commentator, session, lines: list[str], first_offset: int = 0):
    records = [(first_offset + i, line) for i, line in enumerate(lines)]
    return commentator.step([StreamInput(session, records)])


def test_commentary_comes_every_n_records_with_seq_and_offsets() -> None:
    commentator = _commentator()
    session = commentator.new_session("web")
    produced = _feed(commentator, session, LINES[:12])
    assert [(c.seq, c.first_offset, c.last_offset) for c in produced] == [(0, 0, 4), (1, 5, 9)]
    assert session.counters.records_in_turn == 2
    assert session.cache.layout.evicted_total > 0  # the run went past the window


def test_instruction_is_pinned_and_never_evicted() -> None:
    commentator = _commentator()
    session = commentator.new_session("web")
    instruction = kept_token_ids(session.cache)[: session.cache.layout.head].clone()
    _feed(commentator, session, LINES)
    assert session.cache.layout.head == len(instruction) >= SETTINGS.sinks
    assert torch.equal(kept_token_ids(session.cache)[: len(instruction)], instruction)


@pytest.mark.parametrize("name", ["llama", "gpt_neox-partial", "bloom"])
def test_restored_session_continues_exactly_with_zero_prefill(name: str, tmp_path: Path) -> None:
    _assert_restores_exactly(_commentator(name), tmp_path)


def test_repetition_control_replays_exactly_from_the_saved_state(tmp_path: Path) -> None:
    """What the processors look back on is read off the saved cache, not kept beside it."""
    _assert_restores_exactly(_commentator(settings=WIDE, policy=CONTROLLED), tmp_path)


def _assert_restores_exactly(commentator: Commentator, tmp_path: Path) -> None:
    uninterrupted = commentator.new_session("s")
    expected = _feed(commentator, uninterrupted, LINES)

    first = commentator.new_session("s")
    before = _feed(commentator, first, LINES[:17])
    store = LocalDirStore(tmp_path)
    store.save(snapshot(first, commentator))
    state = store.load("s", commentator.loaded.fingerprint)
    resumed = restore(state, commentator)
    assert resumed.prefilled_tokens == 0
    for a, b in zip(first.cache.layers, resumed.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    after = _feed(commentator, resumed, LINES[17:], first_offset=17)
    assert [c.text for c in before + after] == [c.text for c in expected]
    assert [c.seq for c in before + after] == [c.seq for c in expected]
    assert torch.equal(kept_token_ids(resumed.cache), kept_token_ids(uninterrupted.cache))


def test_no_repeat_ngram_bans_what_the_earlier_commentary_in_the_cache_wrote() -> None:
    def turns(policy: CommentaryPolicy) -> list[list[int]]:
        commentator = _commentator(settings=WIDE, policy=policy)
        session = commentator.new_session("s")
        _feed(commentator, session, LINES[:8])
        return [session.cache.tokens_of_span(*span) for span in session.counters.commentary_spans]

    banned = turns(CommentaryPolicy(every_records=2, max_new_tokens=6, no_repeat_ngram=1))
    assert len(banned) == 4 and all(banned[1:])  # the first turn has nothing to look back on
    for index, turn in enumerate(banned):
        earlier = {token for other in banned[:index] for token in other}
        assert len(set(turn)) == len(turn) and not earlier & set(turn)
    free = turns(CommentaryPolicy(every_records=2, max_new_tokens=6))
    assert len({token for turn in free for token in turn}) < sum(map(len, free))


def test_openings_of_commentary_gone_from_the_cache_are_still_banned(tmp_path: Path) -> None:
    """The cache's window holds a few turns only; the openings kept with the counters keep
    later commentary from opening like the evicted ones, and replay exactly."""
    policy = CommentaryPolicy(every_records=2, max_new_tokens=6, no_repeat_ngram=1)
    commentator = _commentator(policy=policy)
    session = commentator.new_session("s")
    written = _feed(commentator, session, LINES)
    openings = session.counters.commentary_openings
    assert len(written) == len(openings) == 20
    assert len(session.counters.commentary_spans) < len(openings)  # most turns were evicted
    tokens = [token for opening in openings for token in opening]
    assert tokens and len(set(tokens)) == len(tokens)
    _assert_restores_exactly(commentator, tmp_path)


def test_state_of_another_model_is_refused() -> None:
    commentator, other = _commentator(seed=0), _commentator(seed=1)
    session = commentator.new_session("s")
    _feed(commentator, session, LINES[:3])
    store = MemoryStore()
    store.save(snapshot(session, commentator))
    with pytest.raises(StateForeignError, match="another model"):
        store.load("s", other.loaded.fingerprint)


# What each reader differs in from the tiny model that wrote the state, and the refusal's words.
OTHER_READERS = {
    "dtype": (
        "llama",
        lambda: _commentator(loaded=tiny_variant("llama", torch.bfloat16)),
        "dtype='float32', but this worker runs dtype='bfloat16'",
    ),
    "rope theta": (
        "llama",
        lambda: _commentator(
            loaded=tiny_variant(
                "llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5}
            )
        ),
        "rope.rope_theta=10000.0, but this worker runs rope.rope_theta=500000.0",
    ),
    "rope scaling": (
        "llama-yarn",
        lambda: _commentator(
            loaded=tiny_variant(
                "llama-yarn",
                rope_parameters={
                    "rope_type": "yarn",
                    "rope_theta": 10000.0,
                    "factor": 8.0,
                    "original_max_position_embeddings": 64,
                },
            )
        ),
        "rope.factor=4.0, but this worker runs rope.factor=8.0",
    ),
    "partial rotary factor": (
        "phi3-partial",
        lambda: _commentator(
            loaded=tiny_variant(
                "phi3-partial",
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                },
            )
        ),
        "rope.partial_rotary_factor=0.5, but this worker runs rope.partial_rotary_factor=0.25",
    ),
    "layer types": (
        "qwen2",
        lambda: _commentator(
            loaded=tiny_variant(
                "qwen2",
                layer_types=["full_attention", "sliding_attention"],
                use_sliding_window=True,
                sliding_window=512,
            )
        ),
        "layer_types[1]='full_attention', but this worker runs layer_types[1]='sliding_attention'",
    ),
    "cache capacity": (
        "llama",
        lambda: _commentator(settings=CacheSettings(sinks=4, window=200)),
        "cache_capacity=128, but this worker runs cache_capacity=204",
    ),
    "sinks": (
        "llama",
        lambda: _commentator(settings=CacheSettings(sinks=2, window=126)),
        "cache_sinks=4, but this worker runs cache_sinks=2",
    ),
}


@pytest.mark.parametrize("field", sorted(OTHER_READERS))
def test_state_written_with_other_settings_is_refused_naming_them(field: str) -> None:
    writer_model, make_reader, difference = OTHER_READERS[field]
    commentator = _commentator(writer_model)
    session = commentator.new_session("s")
    _feed(commentator, session, LINES[:3])
    state = snapshot(session, commentator)
    store = MemoryStore()
    store.save(state)
    reader = make_reader()
    with pytest.raises(StateForeignError, match=re.escape(difference)):
        store.load("s", expected_writer(reader))
    with pytest.raises(StateForeignError, match=re.escape(difference)):
        restore(state, reader)
    assert restore(store.load("s", expected_writer(commentator)), commentator).tokens_seen > 0


def test_state_saved_before_its_settings_were_recorded_still_restores_exactly() -> None:
    commentator = _commentator()
    session = commentator.new_session("s")
    _feed(commentator, session, LINES[:17])
    store = MemoryStore()
    store.save(dataclasses.replace(snapshot(session, commentator), written_with={}))
    resumed = restore(store.load("s", expected_writer(commentator)), commentator)
    texts = [c.text for c in _feed(commentator, resumed, LINES[17:], first_offset=17)]
    assert texts == [c.text for c in _feed(commentator, session, LINES[17:], first_offset=17)]
    wider = _commentator(settings=CacheSettings(sinks=4, window=200))
    with pytest.raises(StateForeignError, match="same --sinks/--window"):
        restore(store.load("s", expected_writer(wider)), wider)


def _piece(tensors: dict[str, torch.Tensor], pick) -> str:
    """The name of the first or last saved cache piece (see snapshot_pieces.py)."""
    return pick(name for name in tensors if name.startswith("kv."))


# Found by tests/models/test_restore_fuzz.py: each raised TypeError or IndexError at the restore,
# or at the next forward, which would have stopped the worker.
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda meta, tensors: meta["counters"].update(added_later=1), "unexpected keyword"),
        (lambda meta, tensors: meta["counters"].update(pending=[10**6]), "vocabulary"),
        (lambda meta, tensors: meta["layout"].update(length="7"), "not an int"),
        (lambda meta, tensors: meta["layout"].update(ring_start=10**4), "inconsistent"),
        (lambda meta, tensors: tensors.update(token_ids=tensors["token_ids"][:9]), "token ids"),
        (lambda meta, tensors: tensors.pop(_piece(tensors, max)), "leave slots .* empty"),
        (lambda meta, tensors: tensors.update({_piece(tensors, min): torch.zeros(3)}), "piece kv"),
    ],
)
def test_a_state_that_does_not_fit_the_cache_is_corrupt(damage, problem: str) -> None:
    commentator = _commentator()
    session = commentator.new_session("s")
    _feed(commentator, session, LINES[:3])
    state = snapshot(session, commentator)
    meta, tensors = copy.deepcopy(dict(state.meta)), dict(state.tensors)
    damage(meta, tensors)
    with pytest.raises(StateCorruptError, match=f"does not fit this cache.*{problem}"):
        restore(dataclasses.replace(state, meta=meta, tensors=tensors), commentator)


def test_a_record_longer_than_the_window_is_fed_in_pieces() -> None:
    commentator = _commentator()
    session = commentator.new_session("s")
    _feed(commentator, session, ["x" * 500])
    assert session.tokens_seen > SETTINGS.capacity
    assert session.cache.get_seq_length() == SETTINGS.capacity


def test_sampling_is_reproducible_per_seed() -> None:
    sampled = CommentaryPolicy(every_records=5, max_new_tokens=8, temperature=1.0, seed=7)
    texts = []
    for _ in range(2):
        commentator = _commentator(policy=sampled)
        texts.append([c.text for c in _feed(commentator, commentator.new_session("s"), LINES[:10])])
    assert texts[0] == texts[1]
    other = _commentator(
        policy=CommentaryPolicy(every_records=5, max_new_tokens=8, temperature=1.0, seed=8)
    )
    assert [c.text for c in _feed(other, other.new_session("s"), LINES[:10])] != texts[0]


def test_cache_larger_than_the_model_attends_is_refused() -> None:
    with pytest.raises(CacheCapacityError, match="lower --window"):
        _commentator(settings=CacheSettings(sinks=4, window=4096))


def test_new_streams_open_as_copies_of_one_prefill_of_the_instruction() -> None:
    commentator = _commentator()
    first, second = commentator.new_session("a"), commentator.new_session("b")
    fresh = commentator.new_empty_session("c")
    instruction = commentator._tokens(
        commentator.format.instruction_text(commentator.prompt.instruction)
    )
    fresh.cache.pin(len(instruction))
    commentator.feed(fresh, instruction)
    assert first.prefilled_tokens == len(instruction) and second.prefilled_tokens == 0
    assert first.cache.slot != second.cache.slot
    for session in (first, second):
        assert session.cache.layout.to_meta() == fresh.cache.layout.to_meta()
        assert torch.equal(session.cache.token_ids, fresh.cache.token_ids)
        for a, b in zip(session.cache.layers, fresh.cache.layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    _feed(commentator, first, LINES[:7])  # one stream going on leaves the next one's opening
    third = commentator.new_session("d")
    assert torch.equal(third.cache.layers[0].keys, fresh.cache.layers[0].keys)
