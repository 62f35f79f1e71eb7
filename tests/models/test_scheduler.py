"""The scheduler on a tiny random model: shared decode forwards, the same output, fair turns."""

from __future__ import annotations

import torch

from tests.models.tiny_models import VOCAB, tiny_loaded
from worker.exceptions import CacheDamagedError
from worker.model.cache_settings import BatchSettings, CacheSettings
from worker.model.decoder import Decoder
from worker.model.sampling import Sampler
from worker.model.scheduler import GenerationRequest, Prefill, Scheduler
from worker.stream.chat_format import Prompt
from worker.stream.commentator import Commentator, StreamInput
from worker.stream.policy import CommentaryPolicy

SETTINGS = CacheSettings(sinks=4, window=60, max_chunk=16)


class RecordingDecoder(Decoder):
    """The decoder, noting each forward: ('prefill', cache) or ('decode', rows)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.forwards: list[tuple[str, object]] = []

    def prefill(self, cache, tokens):
        self.forwards.append(("prefill", cache))
        return super().prefill(cache, tokens)

    def decode(self, caches, tokens):
        self.forwards.append(("decode", len(caches)))
        return super().decode(caches, tokens)

    def widest_step(self) -> int:
        return max(rows for kind, rows in self.forwards if kind == "decode")


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))


def _commentator(max_batch: int | None) -> tuple[Commentator, RecordingDecoder]:
    commentator = Commentator(
        tiny_loaded("llama"),
        SETTINGS,
        CommentaryPolicy(every_records=3, max_new_tokens=5),
        Prompt(instruction="Watch."),
        BatchSettings(max_batch),
    )
    commentator.decoder = RecordingDecoder(commentator.loaded, SETTINGS)
    commentator.scheduler = Scheduler(commentator.decoder, BatchSettings(max_batch))
    return commentator, commentator.decoder


def _stream_records(stream: int) -> list[tuple[int, str]]:
    """Streams of different lengths, so their turns close at different records."""
    return [
        (i, f"12:00:{i:02d} svc{stream} request {i * stream} took {i}ms")
        for i in range(4 + 3 * stream)
    ]


def test_streams_write_the_same_commentary_whatever_batch_they_decode_in() -> None:
    outputs, widest = {}, {}
    for max_batch in (None, 2, 1):
        commentator, decoder = _commentator(max_batch)
        sessions = [commentator.new_session(f"s{i}") for i in range(5)]
        produced = commentator.step(
            [StreamInput(s, _stream_records(i)) for i, s in enumerate(sessions)]
        )
        outputs[max_batch] = [(c.stream_id, c.seq, c.text) for c in produced]
        widest[max_batch] = decoder.widest_step()
    assert outputs[None] == outputs[2] == outputs[1]
    assert len(outputs[None]) == sum((4 + 3 * i) // 3 for i in range(5))
    assert widest == {None: 5, 2: 2, 1: 1}


def _generation(cache, tokens: int, seed: int) -> GenerationRequest:
    return GenerationRequest(cache, _ids(6, seed), Sampler(), tokens, frozenset())


def test_rows_join_in_arrival_order_and_a_long_turn_holds_up_only_its_own_row() -> None:
    decoder = RecordingDecoder(tiny_loaded("llama"), SETTINGS)
    caches = [decoder.new_cache() for _ in range(4)]
    lengths = [20, 3, 3, 3]  # one long turn, then short ones
    Scheduler(decoder, BatchSettings(2)).generate(
        [_generation(cache, n, i) for i, (cache, n) in enumerate(zip(caches, lengths, strict=True))]
    )
    starts = [
        i
        for kind, cache in decoder.forwards
        if kind == "prefill"
        for i in range(4)
        if caches[i] is cache
    ]
    assert starts == [0, 1, 2, 3]
    # The short turns ran beside the long one, two rows a step, not after it.
    steps = [rows for kind, rows in decoder.forwards if kind == "decode"]
    assert steps.count(2) == 9 and len(steps) == 20


def test_a_stream_with_much_to_prefill_takes_turns_with_the_others() -> None:
    decoder = RecordingDecoder(tiny_loaded("llama"), SETTINGS)
    busy, quiet = decoder.new_cache(), decoder.new_cache()

    def prefills(cache, count):
        for piece in range(count):
            yield Prefill(cache, _ids(8, piece))

    def one_turn(cache):
        return (yield _generation(cache, 2, 9))

    Scheduler(decoder, BatchSettings(1)).run([prefills(busy, 5), one_turn(quiet)])
    order = [
        "busy" if cache is busy else "quiet"
        for kind, cache in decoder.forwards
        if kind == "prefill"
    ]
    assert order[:3] == ["busy", "quiet", "busy"]


def test_a_job_whose_forward_fails_ends_alone_and_the_others_go_on() -> None:
    decoder = Decoder(tiny_loaded("llama"), SETTINGS)
    scheduler = Scheduler(decoder)
    caches = [decoder.new_cache() for _ in range(3)]
    alone = Scheduler(decoder).generate([_generation(decoder.new_cache(), 4, 0)])[0]
    caches[1].damaged = True
    outcomes = scheduler.run([_turn(caches[0], 0), _turn(caches[1], 1), _turn(caches[2], 0)])
    assert outcomes[0] == outcomes[2] == alone
    assert isinstance(outcomes[1], CacheDamagedError)


def _turn(cache, seed: int):
    return (yield _generation(cache, 4, seed))
