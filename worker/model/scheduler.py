"""Continuous batching: the model work of many streams in as few forwards as it can.

A job is one stream's work, written as a generator. It yields what it needs of the model, a
`Prefill` (tokens into its cache; the last logits come back) or a `GenerationRequest` (a turn
to write; the written tokens come back), and returns its result. The scheduler runs every job
of a step at once:
- waiting ops run first come, first served: a prefill is one forward of its own (its bits
  are a function of its stream alone, and on the CPU a chunk is already as wide as a batch);
  a generation feeds its prompt and joins the decoding rows;
- every decoding row then takes one token in one batched decode step; a row leaves at its stop
  token or its length cap, its job goes on, and what it yields next waits its turn.
With `max_batch`, at most that many rows decode at once; waiting ops run only while a row is
free, so a row, once in, writes a token every step and no job waits longer than the rows ahead
of it take to finish (fairness by arrival). `max_batch=1` is the sequential path: one
stream's turn at a time.

A stream's output does not depend on its batch (batch_invariance.py), so the scheduling order
changes speed only. A job whose op fails with a StreamsinkError gets it thrown in; if it lets
it through, that error is its outcome and the other jobs go on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from worker.exceptions import StreamsinkError
from worker.model.cache_settings import BatchSettings
from worker.model.decoder import Decoder
from worker.model.sampling import Sampler
from worker.model.sink_cache import SinkCache

T = TypeVar("T")


@dataclass(frozen=True)
class Prefill:
    """Feed 1-D `tokens` into `cache`; the job is sent the last token's logits [vocab]."""

    cache: SinkCache
    tokens: torch.Tensor


@dataclass(frozen=True)
class GenerationRequest:
    """Feed `prompt` into `cache`, then write up to `max_new_tokens` tokens, each kept there.
    The job is sent the written tokens, stop tokens left out.

    The sampler's processors see `history` and then the tokens written so far.
    """

    cache: SinkCache
    prompt: torch.Tensor  # 1-D: the tokens that close the turn
    sampler: Sampler
    max_new_tokens: int
    stop_ids: frozenset[int]
    history: Sequence[int] = ()


Op = Prefill | GenerationRequest
Job = Generator[Op, Any, T]


@dataclass
class _Row:
    """A generation being decoded: what it wrote, what its processors see, its next logits
    (on the host, where it picks)."""

    job: int
    request: GenerationRequest
    logits: torch.Tensor
    written: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, decoder: Decoder, settings: BatchSettings = BatchSettings()) -> None:
        self.decoder = decoder
        self.settings = settings

    def run(self, jobs: Sequence[Job[T]]) -> list[T | StreamsinkError]:
        """Every job's result, or the StreamsinkError it ended with, in the order given."""
        return _Run(self.decoder, self.settings.max_batch, jobs).outcomes()

    def run_raising(self, jobs: Sequence[Job[T]]) -> list[T]:
        """Every job's result, in the order given; the first error raised."""
        outcomes = self.run(jobs)
        for outcome in outcomes:
            if isinstance(outcome, StreamsinkError):
                raise outcome
        return outcomes

    def run_alone(self, job: Job[T]) -> T:
        """One job's result; its error raised."""
        [result] = self.run_raising([job])
        return result

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Each request's written tokens, decoded together."""
        return self.run_raising([_generation(request) for request in requests])


def _generation(request: GenerationRequest) -> Job[list[int]]:
    return (yield request)


class _Run:
    """One `Scheduler.run`: the jobs, their waiting ops and their decoding rows."""

    def __init__(self, decoder: Decoder, max_batch: int | None, jobs: Sequence[Job]) -> None:
        self.decoder = decoder
        self.width = max_batch or len(jobs)
        self.jobs = list(jobs)
        self.results: list[object] = [None] * len(self.jobs)
        self.waiting: deque[tuple[int, Op]] = deque()
        self.rows: list[_Row] = []

    def outcomes(self) -> list:
        for index in range(len(self.jobs)):
            self._resume(index, None)
        while self.waiting or self.rows:
            while self.waiting and len(self.rows) < self.width:
                self._start(*self.waiting.popleft())
            if self.rows:
                self._decode_step()
        return self.results

    def _resume(self, index: int, sent: object) -> None:
        """Send the job what its op gave (an error is thrown in); queue what it yields next."""
        job = self.jobs[index]
        try:
            op = job.throw(sent) if isinstance(sent, StreamsinkError) else job.send(sent)
        except StopIteration as done:
            self.results[index] = done.value
        except StreamsinkError as error:
            self.results[index] = error
        else:
            self.waiting.append((index, op))

    def _start(self, index: int, op: Op) -> None:
        """Run a prefill, or feed a generation's prompt and make it a decoding row."""
        tokens = op.tokens if isinstance(op, Prefill) else op.prompt
        try:
            logits = self.decoder.prefill(op.cache, tokens)
        except StreamsinkError as error:
            self._resume(index, error)
            return
        if isinstance(op, Prefill):
            self._resume(index, logits)
        elif op.max_new_tokens <= 0:
            self._resume(index, [])
        else:
            self.rows.append(_Row(index, op, logits.cpu(), seen=list(op.history)))

    def _decode_step(self) -> None:
        """Every row picks its next token; the rows not stopping feed theirs in one forward."""
        going = []
        for row in list(self.rows):
            token = row.request.sampler.pick(row.seen, row.logits)
            if token in row.request.stop_ids:
                self._finish(row, row.written)
            else:
                row.written.append(token)
                row.seen.append(token)
                going.append(row)
        if not going:
            return
        caches = [row.request.cache for row in going]
        try:
            logits = self.decoder.decode(caches, torch.tensor([row.written[-1] for row in going]))
        except StreamsinkError as error:
            for row in going:
                self._finish(row, error)
            return
        # Picked on the host (as a prefill's): on a GPU, one copy a step, not a few small ops
        # and two waits for the device in every row's pick.
        for row, last in zip(going, logits.cpu(), strict=True):
            row.logits = last
            if len(row.written) >= row.request.max_new_tokens:
                self._finish(row, row.written)

    def _finish(self, row: _Row, outcome: object) -> None:
        self.rows.remove(row)
        self._resume(row.job, outcome)
