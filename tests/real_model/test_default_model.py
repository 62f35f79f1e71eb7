"""The embedded default model (SmolLM2-135M-Instruct from its PyPI wheel), end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cache_store.local import LocalDirStore
from worker.model.cache_settings import CacheSettings
from worker.model.decoder import forward_step
from worker.model.loading import LoadedModel, load_model
from worker.model.sink_cache import SinkCache
from worker.stream.chat_format import ChatFormat
from worker.stream.commentator import Commentator, StreamInput
from worker.stream.policy import CommentaryPolicy
from worker.stream.session_state import restore, snapshot
from worker.tools.evaluation import EvalMode, evaluate_perplexity

pytestmark = pytest.mark.real_model
SAMPLE = Path(__file__).parents[2] / "worker" / "samples" / "app.log"


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(None, device="cpu")


def test_default_model_is_the_instruct_llama_with_its_chat_template(loaded: LoadedModel) -> None:
    assert loaded.model.config.model_type == "llama"
    assert loaded.model.config.num_hidden_layers == 30
    chat = ChatFormat.from_tokenizer(loaded.tokenizer)
    assert chat.commentary_open.endswith("<|im_start|>assistant\n")
    assert load_model(None, device="cpu").fingerprint == loaded.fingerprint


def test_logits_equal_a_plain_forward_before_the_first_eviction(loaded: LoadedModel) -> None:
    model = loaded.model
    ids = torch.tensor(loaded.tokenizer(SAMPLE.read_text()[:1500])["input_ids"][:200])
    cache = SinkCache.for_model(model, 256, 4)
    with torch.inference_mode():
        chunked = torch.cat([forward_step(model, cache, piece) for piece in ids.split(37)])
        plain = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=2e-4)


def test_sink_stays_close_to_recompute_and_window_does_not(loaded: LoadedModel) -> None:
    text = SAMPLE.read_text()
    ppl = {
        mode: evaluate_perplexity(loaded, text, mode, sinks=4, window=60, max_tokens=320).perplexity
        for mode in (EvalMode.SINK, EvalMode.WINDOW, EvalMode.RECOMPUTE)
    }
    assert ppl[EvalMode.SINK] < ppl[EvalMode.WINDOW]
    assert abs(ppl[EvalMode.SINK] - ppl[EvalMode.RECOMPUTE]) < (
        ppl[EvalMode.WINDOW] - ppl[EvalMode.RECOMPUTE]
    )


def test_saved_and_loaded_stream_writes_the_same_next_commentary(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    commentator = Commentator(
        loaded,
        CacheSettings(sinks=4, window=188),
        CommentaryPolicy(every_records=6, max_new_tokens=12),
    )
    lines = SAMPLE.read_text().splitlines()[:18]
    session = commentator.new_session("app")
    commentator.step([StreamInput(session, list(enumerate(lines[:12])))])
    store = LocalDirStore(tmp_path)
    store.save(snapshot(session, commentator))
    resumed = restore(store.load("app", loaded.fingerprint), commentator)
    rest = list(enumerate(lines[12:], start=12))
    expected = commentator.step([StreamInput(session, rest)])
    actual = commentator.step([StreamInput(resumed, rest)])
    assert [c.text for c in actual] == [c.text for c in expected] and expected
    assert resumed.prefilled_tokens < session.prefilled_tokens
