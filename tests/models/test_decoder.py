"""The decoder and its samplers on a tiny random model: feeding, generating, picking."""

from __future__ import annotations

import warnings

import torch

from tests.models.tiny_models import VOCAB, tiny_loaded
from worker.model.cache_settings import CacheSettings
from worker.model.decoder import Decoder, forward_step
from worker.model.sampling import Sampler
from worker.model.scheduler import GenerationRequest, Scheduler

SETTINGS = CacheSettings(sinks=4, window=60, max_chunk=16)


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def test_prefill_in_chunks_gives_the_logits_of_one_forward() -> None:
    decoder = Decoder(tiny_loaded("llama"), SETTINGS)
    assert decoder.chunk == 16
    ids = _ids(40, 1)
    chunked, other = decoder.new_cache(), decoder.new_cache()
    last, last_other = decoder.prefill(chunked, ids), decoder.prefill(other, ids[:20])
    with torch.inference_mode():
        whole = forward_step(decoder.model, decoder.new_cache(), ids)
    torch.testing.assert_close(last, whole[-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last_other, whole[19], rtol=1e-4, atol=1e-5)
    assert chunked.layout.tokens_seen == 40 and other.layout.tokens_seen == 20


def test_generate_in_lock_step_writes_what_each_request_writes_alone() -> None:
    decoder = Decoder(tiny_loaded("llama"), SETTINGS)
    scheduler = Scheduler(decoder)

    def request(prompt: torch.Tensor, cache, tokens: int, stops=frozenset()):
        return GenerationRequest(cache, prompt, Sampler(), tokens, stops)

    prompts = [_ids(12, 2), _ids(30, 3)]
    alone = [
        scheduler.generate([request(p, decoder.new_cache(), n)])[0]
        for p, n in ((prompts[0], 5), (prompts[1], 9))
    ]
    caches = [decoder.new_cache(), decoder.new_cache()]
    together = scheduler.generate(
        [request(prompts[0], caches[0], 5), request(prompts[1], caches[1], 9)]
    )
    assert together == alone and [len(w) for w in together] == [5, 9]
    assert [c.layout.tokens_seen for c in caches] == [12 + 5, 30 + 9]  # every token kept
    stop = alone[1][2]
    stopped = scheduler.generate([request(prompts[1], decoder.new_cache(), 9, frozenset([stop]))])
    assert stopped == [alone[1][: alone[1].index(stop)]]


def test_greedy_takes_the_argmax_and_drawing_replays_per_generator() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(4))
    assert Sampler().pick([1, 2], logits) == int(logits.argmax())
    draws = [
        [Sampler.drawing(1.0, 1.0, generator).pick([1], logits) for _ in range(20)]
        for generator in (torch.Generator().manual_seed(5) for _ in range(2))
    ]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    narrow = Sampler.drawing(1.0, 1e-6, torch.Generator().manual_seed(6))
    assert {narrow.pick([1], logits) for _ in range(10)} == {int(logits.argmax())}


def test_feeding_and_decoding_pass_the_cache_without_a_deprecation_warning() -> None:
    """The cache goes to the forward under the name the installed transformers expects."""
    decoder = Decoder(tiny_loaded("llama"), SETTINGS)
    caches = [decoder.new_cache(), decoder.new_cache()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder.prefill(caches[0], _ids(8, 3))
        decoder.prefill(caches[1], _ids(5, 4))
        decoder.decode(caches, _ids(2, 5))  # one batched decode step
    assert [str(w.message) for w in caught if "deprecated" in str(w.message)] == []
    assert [cache.layout.tokens_seen for cache in caches] == [9, 6]
