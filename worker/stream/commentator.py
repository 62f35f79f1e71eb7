"""The engine: runs the model over sessions, feeding records and writing commentary.

Every forward goes through a session's SinkCache, so the cost per token stays constant however
long a stream runs. `step` takes a list of sessions with their records; they run one after the
other today, and the list is where batching them into one forward will go.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from dataclasses import dataclass

import torch

from worker.exceptions import CacheCapacityError
from worker.model.loading import LoadedModel
from worker.model.sink_cache import SinkCache
from worker.stream.chat_format import DEFAULT_INSTRUCTION, DEFAULT_REQUEST, ChatFormat
from worker.stream.policy import CommentaryPolicy
from worker.stream.records import Commentary
from worker.stream.session import StreamSession


@dataclass(frozen=True)
class CacheSettings:
    sinks: int = 4
    window: int = 1020
    max_chunk: int = 256  # longer inputs are fed in pieces of at most this many tokens

    @property
    def capacity(self) -> int:
        return self.sinks + self.window


@dataclass(frozen=True)
class StreamInput:
    """Records of one stream for one step: (offset, text) in offset order."""

    session: StreamSession
    records: list[tuple[int, str]]


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheSettings = CacheSettings(),
        policy: CommentaryPolicy = CommentaryPolicy(),
        instruction: str = DEFAULT_INSTRUCTION,
        request: str = DEFAULT_REQUEST,
    ) -> None:
        if cache.capacity > loaded.max_cache:
            raise CacheCapacityError(
                f"a cache of {cache.capacity} tokens exceeds what {loaded.name} can attend to "
                f"({loaded.max_cache}); lower --window"
            )
        self.loaded = loaded
        self.settings = cache
        self.policy = policy
        self.format = ChatFormat.from_tokenizer(loaded.tokenizer)
        self.instruction = instruction
        self.request = request
        self._chunk = min(cache.max_chunk, cache.window // 2)
        self._stop_ids = _stop_token_ids(loaded)
        self._logits_to_keep = (
            "logits_to_keep" in inspect.signature(loaded.model.forward).parameters
        )

    def new_empty_session(self, stream_id: str) -> StreamSession:
        """A session with an empty cache (to restore a saved state into)."""
        cache = SinkCache.for_model(self.loaded.model, self.settings.capacity, self.settings.sinks)
        return StreamSession(stream_id, cache)

    def new_session(self, stream_id: str) -> StreamSession:
        """A session whose cache holds the instruction, pinned so it is never evicted."""
        session = self.new_empty_session(stream_id)
        instruction = self._tokens(self.format.instruction_text(self.instruction))
        session.cache.pin(len(instruction))
        self.feed(session, instruction)
        return session

    def step(self, inputs: list[StreamInput]) -> list[Commentary]:
        """Feed each stream's records; return the commentary that came due, in order."""
        produced: list[Commentary] = []
        for item in inputs:
            for offset, text in item.records:
                commentary = self.apply_record(item.session, offset, text)
                if commentary is not None:
                    produced.append(commentary)
        return produced

    def apply_record(self, session: StreamSession, offset: int, text: str) -> Commentary | None:
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
        self._queue(session, tokens.tolist())
        counters.records_seen += 1
        counters.records_in_turn += 1
        counters.tokens_in_turn += len(tokens)
        counters.next_offset = offset + 1
        return self.comment_if_due(session)

    def _queue(self, session: StreamSession, tokens: list[int]) -> None:
        """Hold record tokens until a full chunk (or a commentary) is due, then feed them.

        Feeding whole chunks reads the weights once per chunk instead of once per record.
        Chunk boundaries depend only on the stream's tokens and triggers (pending tokens are
        saved with the state), so a stream cut into runs anywhere gets the same cache.
        """
        pending = session.counters.pending
        pending.extend(tokens)
        full = len(pending) - len(pending) % self._chunk
        if full:
            self.feed(session, torch.tensor(pending[:full]))
            del pending[:full]

    def comment_if_due(self, session: StreamSession) -> Commentary | None:
        c = session.counters
        if not self.policy.due(c.records_in_turn, c.tokens_in_turn, session.seconds_in_turn()):
            return None
        return self.comment(session)

    def comment(self, session: StreamSession) -> Commentary:
        """Close the user turn, let the model write its turn, and keep both in the cache."""
        counters = session.counters
        request = f"\n{self.request}" if self.request else ""
        closing = self._tokens(request + self.format.commentary_open).tolist()
        logits = self.feed(session, torch.tensor(counters.pending + closing))
        counters.pending = []
        generator = self._generator(session.stream_id, counters.next_seq)
        written: list[int] = []
        for _ in range(self.policy.max_new_tokens):
            token = self._pick(logits, generator)
            if token in self._stop_ids:
                break
            written.append(token)
            logits = self.feed(session, torch.tensor([token]))
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

    @torch.inference_mode()
    def feed(self, session: StreamSession, tokens: torch.Tensor) -> torch.Tensor:
        """Run `tokens` through the model into the session's cache; the last token's logits."""
        if len(tokens) == 0:
            raise CacheCapacityError("nothing to feed: an empty chunk")
        logits = None
        for piece in tokens.split(self._chunk):
            logits = forward_step(self.loaded.model, session.cache, piece, self._logits_to_keep)[-1]
            session.prefilled_tokens += len(piece)
        return logits

    def _tokens(self, text: str) -> torch.Tensor:
        ids = self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def _pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.policy.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.policy.temperature, dim=-1)
        if self.policy.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.policy.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))

    def _generator(self, stream_id: str, seq: int) -> torch.Generator | None:
        """A generator seeded by (seed, stream, seq): sampling replays exactly after a move."""
        if self.policy.greedy:
            return None
        material = f"{self.policy.seed}:{stream_id}:{seq}".encode()
        seed = int.from_bytes(hashlib.sha256(material).digest()[:8], "little")
        return torch.Generator().manual_seed(seed)


def forward_step(
    model: torch.nn.Module, cache: SinkCache, tokens: torch.Tensor, last_only: bool = False
) -> torch.Tensor:
    """One forward of 1-D `tokens` through `cache`: logits [tokens (or 1), vocab]."""
    kwargs = {"logits_to_keep": 1} if last_only else {}
    with cache.step(tokens):
        out = model(
            input_ids=tokens[None].to(model.device), past_key_values=cache, use_cache=True, **kwargs
        )
    return out.logits[0]


def _stop_token_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}
