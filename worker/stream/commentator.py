"""The commentator: a stream as a dialogue, records in, commentary out, over the decoder.

It owns the dialogue (turns, triggers, seq and offsets) and leaves every forward to the
decoder, so the cost per token stays constant however long a stream runs. A stream's work is a
job (see scheduler.py): it yields the prefills and the turns it needs and returns the
commentary that came due. `run` hands the jobs of many streams to the scheduler together, so
their turns are written in shared forwards; what each stream writes is the same as alone.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from worker.exceptions import StreamsinkError
from worker.model.cache_settings import BatchSettings, CacheSettings
from worker.model.decoder import Decoder
from worker.model.loading import LoadedModel
from worker.model.sampling import Sampler, repetition_controls
from worker.model.scheduler import GenerationRequest, Job, Prefill, Scheduler
from worker.model.sink_cache import SinkCache
from worker.stream.chat_format import ChatFormat, Prompt
from worker.stream.policy import CommentaryPolicy
from worker.stream.records import Commentary
from worker.stream.session import StreamSession

# How much of each earlier commentary repetition control remembers once its turn has left the
# cache: an opening longer than the n-gram it bans, for the last commentaries of the stream.
OPENING_TOKENS = 12
OPENINGS_KEPT = 32


@dataclass(frozen=True)
class StreamInput:
    """Records of one stream for one step: (offset, text) in offset order."""

    session: StreamSession
    records: list[tuple[int, str]]


class Commentator:
    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheSettings = CacheSettings(),
        policy: CommentaryPolicy = CommentaryPolicy(),
        prompt: Prompt = Prompt(),
        batching: BatchSettings = BatchSettings(),
    ) -> None:
        self.decoder = Decoder(loaded, cache)
        self.scheduler = Scheduler(self.decoder, batching)
        self.loaded = loaded
        self.settings = cache
        self.policy = policy
        self.prompt = prompt
        self.format = ChatFormat.from_tokenizer(loaded.tokenizer)
        self._opening: SinkCache | None = None  # the instruction's cache, copied by new streams

    def new_empty_session(self, stream_id: str) -> StreamSession:
        """A session with an empty cache (to restore a saved state into)."""
        return StreamSession(stream_id, self.decoder.new_cache())

    def new_session(self, stream_id: str) -> StreamSession:
        """A session whose cache holds the instruction, pinned so it is never evicted.

        The instruction is computed once: every stream opens as a copy of the first cache that
        took it, the same bits (the forward is a function of its tokens alone), in its own slot.
        """
        prefilled = 0
        if self._opening is None:
            opening = self.new_empty_session(stream_id)
            instruction = self._tokens(self.format.instruction_text(self.prompt.instruction))
            opening.cache.pin(len(instruction))
            self.feed(opening, instruction)
            self._opening, prefilled = opening.cache, opening.prefilled_tokens
        return StreamSession(stream_id, self._opening.clone(), prefilled_tokens=prefilled)

    def run(self, inputs: list[StreamInput]) -> list[list[Commentary] | StreamsinkError]:
        """Feed each stream's records, the streams together; per input, the commentary that
        came due in order, or the error that stopped that stream (the others go on)."""
        return self.scheduler.run([self.records_job(i.session, i.records) for i in inputs])

    def step(self, inputs: list[StreamInput]) -> list[Commentary]:
        """`run`, the commentary of every input in input order; the first error raised."""
        jobs = [self.records_job(i.session, i.records) for i in inputs]
        return [c for produced in self.scheduler.run_raising(jobs) for c in produced]

    def records_job(self, session: StreamSession, records: list[tuple[int, str]]) -> Job:
        """The job of one stream's records: the commentary that came due, in order."""
        produced: list[Commentary] = []
        for offset, text in records:
            commentary = yield from self._apply_record(session, offset, text)
            if commentary is not None:
                produced.append(commentary)
        return produced

    def _apply_record(self, session: StreamSession, offset: int, text: str) -> Job:
        counters = session.counters
        opening = ""
        if not counters.turn_open:
            opening = (
                self.format.next_user_open
                if counters.started_dialogue
                else (self.format.first_user_open)
            )
            counters.turn_open, counters.started_dialogue = True, True
            counters.first_offset_in_turn = offset
            session.turn_started_at = time.monotonic()
        tokens = self._tokens(opening + text.rstrip("\n") + "\n")
        yield from self._queue(session, tokens.tolist())
        counters.records_seen += 1
        counters.records_in_turn += 1
        counters.tokens_in_turn += len(tokens)
        counters.next_offset = offset + 1
        return (yield from self.due_job(session))

    def _queue(self, session: StreamSession, tokens: list[int]) -> Job:
        """Hold record tokens until a full chunk (or a commentary) is due, then feed them.

        Feeding whole chunks reads the weights once per chunk instead of once per record.
        Chunk boundaries depend only on the stream's tokens and triggers (pending tokens are
        saved with the state), so a stream cut into runs anywhere gets the same cache.
        """
        pending = session.counters.pending
        pending.extend(tokens)
        full = len(pending) - len(pending) % self.decoder.chunk
        if full:
            yield from self._feed(session, torch.tensor(pending[:full]))
            del pending[:full]

    def due_job(self, session: StreamSession) -> Job:
        """The job of a stream's commentary if a trigger (the clock's too) says it is due;
        None if not."""
        c = session.counters
        if not self.policy.due(c.records_in_turn, c.tokens_in_turn, session.seconds_in_turn()):
            return None
        return (yield from self._comment(session))

    def _comment(self, session: StreamSession) -> Job:
        """Close the user turn, let the model write its turn, and keep both in the cache."""
        counters = session.counters
        request = f"\n{self.prompt.request}" if self.prompt.request else ""
        closing = self._tokens(request + self.format.commentary_open).tolist()
        prompt = torch.tensor(counters.pending + closing)
        sampler = self._sampler(session.stream_id, counters.next_seq)
        start = session.cache.layout.tokens_seen + len(prompt)
        written = yield GenerationRequest(
            session.cache,
            prompt,
            sampler,
            self.policy.max_new_tokens,
            self.decoder.stop_ids,
            history=self._earlier_commentary(session),
        )
        counters.pending = []
        counters.commentary_spans.append([start, start + len(written)])
        openings = [*counters.commentary_openings, list(written[:OPENING_TOKENS])]
        counters.commentary_openings = openings[-OPENINGS_KEPT:]
        session.prefilled_tokens += len(prompt) + len(written)
        commentary = Commentary(
            stream_id=session.stream_id,
            seq=counters.next_seq,
            first_offset=counters.first_offset_in_turn,
            last_offset=counters.next_offset - 1,
            text=self.loaded.tokenizer.decode(written, skip_special_tokens=True).strip(),
            model=self.loaded.name,
            time=time.time(),
        )
        counters.next_seq += 1
        counters.last_commentary_time = commentary.time
        counters.turn_open = False
        counters.records_in_turn = counters.tokens_in_turn = 0
        return commentary

    def _earlier_commentary(self, session: StreamSession) -> list[int]:
        """The openings of the stream's last commentaries (saved with its counters), then its
        earlier commentary turns that the cache still holds, oldest first, read off the cache's
        own token ids: a restored stream looks back on exactly the same.

        Turns evicted whole are forgotten here too, so the saved spans stay few.
        """
        history = [token for opening in session.counters.commentary_openings for token in opening]
        kept = []
        for start, end in session.counters.commentary_spans:
            tokens = session.cache.tokens_of_span(start, end)
            if tokens:
                history += tokens
                kept.append([start, end])
        session.counters.commentary_spans = kept
        return history

    def feed(self, session: StreamSession, tokens: torch.Tensor) -> torch.Tensor:
        """Run `tokens` into the session's cache; the last token's logits."""
        return self.scheduler.run_alone(self._feed(session, tokens))

    def _feed(self, session: StreamSession, tokens: torch.Tensor) -> Job:
        logits = yield Prefill(session.cache, tokens)
        session.prefilled_tokens += len(tokens)
        return logits

    def _tokens(self, text: str) -> torch.Tensor:
        ids = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def _sampler(self, stream_id: str, seq: int) -> Sampler:
        """Greedy, or drawing with a generator seeded by (seed, stream, seq): sampling replays
        exactly after a move. Either way after the policy's repetition control."""
        policy = self.policy
        controls = repetition_controls(policy.repetition_penalty, policy.no_repeat_ngram)
        if policy.greedy:
            return Sampler(LogitsProcessorList(controls))
        material = f"{policy.seed}:{stream_id}:{seq}".encode()
        seed = int.from_bytes(hashlib.sha256(material).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        return Sampler.drawing(policy.temperature, policy.top_p, generator, controls)
