"""Restore fuzzed: a state the codec accepts but that does not fit is a StateError, not a crash.

A real snapshot of a tiny model has its meta edited (any field deleted, added, of any wrong
type) or one tensor damaged (dropped, cut short, another dtype, another head shape, an extra
layer). The processor handles a StateError as a bad state; anything else would stop the
worker, at the restore or at the stream's next forward, so a restored session must also take
a step. 200 cases by default, seeded per case; more by hand with
`STREAMSINK_RESTORE_FUZZ_CASES=2000 pytest tests/models/test_restore_fuzz.py`.
"""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch

from cache_store.exceptions import StateError
from cache_store.state import StreamState
from tests.models.checkpoint_harness import tiny_commentator
from tests.state_mutations import edit_tree
from worker.exceptions import StreamsinkError
from worker.model.cache_settings import CacheSettings
from worker.stream.commentator import Commentator, StreamInput
from worker.stream.policy import CommentaryPolicy
from worker.stream.session_state import restore, snapshot

CASES = int(os.environ.get("STREAMSINK_RESTORE_FUZZ_CASES", 200))


@pytest.fixture(scope="module")
def saved() -> tuple[Commentator, StreamState]:
    commentator = tiny_commentator(
        CacheSettings(sinks=4, window=60, max_chunk=32),
        CommentaryPolicy(every_records=3, max_new_tokens=4),
    )
    session = commentator.new_session("s")
    commentator.step([StreamInput(session, [(i, f"line {i} ERROR x") for i in range(8)])])
    return commentator, snapshot(session, commentator)


def _damaged(state: StreamState, rng: random.Random) -> StreamState:
    meta, tensors = copy.deepcopy(dict(state.meta)), dict(state.tensors)
    if rng.random() < 0.6:
        meta = edit_tree(rng, meta)
        meta = meta if type(meta) is dict else {"kind": meta}
    else:
        name = rng.choice(sorted(tensors))
        tensor = tensors[name]
        op = rng.randrange(5)
        if op == 0:
            del tensors[name]
        elif op == 1:
            tensors[name] = tensor.reshape(-1)[: max(0, tensor.numel() - rng.randrange(1, 64))]
        elif op == 2:
            tensors[name] = tensor.to(rng.choice([torch.float16, torch.int64, torch.bool]))
        elif op == 3 and tensor.dim() == 4:
            tensors[name] = tensor[:, :1] if rng.random() < 0.5 else tensor[..., :2]
        else:
            tensors[rng.choice([name + "x", "layer7.keys.0"])] = tensor
    return StreamState(state.stream_id, state.fingerprint, tensors, meta, state.written_with)


def test_a_state_that_does_not_fit_is_a_state_error(saved) -> None:
    commentator, state = saved
    escaped = {}
    for index in range(CASES):
        damaged = _damaged(state, random.Random(index))
        try:
            session = restore(damaged, commentator)
        except StateError:  # a bad state: the processor sets the stream aside
            continue
        except Exception as error:  # noqa: BLE001 - any other outcome is the defect sought
            escaped.setdefault(f"restore: {type(error).__name__}", f"case {index}: {error}")
            continue
        try:
            commentator.step([StreamInput(session, [(100, "next line")])])
        except StreamsinkError:  # an engine error: the processor sets the records aside
            continue
        except Exception as error:  # noqa: BLE001
            escaped.setdefault(f"step: {type(error).__name__}", f"case {index}: {error}")
    assert escaped == {}
