"""How the next token is picked from the last logits: transformers' logits processors, then
argmax (greedy) or one draw from a caller-seeded generator (sampling that replays exactly).

Repetition control is transformers' own processors (a repetition penalty, no repeated
n-grams): they change the scores before the pick, so nothing written is edited afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


def repetition_controls(penalty: float = 1.0, no_repeat_ngram: int = 0) -> list[LogitsProcessor]:
    """Processors that keep the model off what it has already written: a penalty on every
    token it wrote (1.0 = none) and a ban on repeating any n-gram of it (0 = none)."""
    controls: list[LogitsProcessor] = []
    if penalty != 1.0:
        controls.append(RepetitionPenaltyLogitsProcessor(penalty))
    if no_repeat_ngram > 0:
        controls.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram))
    return controls


@dataclass(frozen=True)
class Sampler:
    """Processors run in order on the scores; greedy takes the argmax, otherwise one is drawn.

    Processors see the token ids their decoder hands over (the request's history and the
    tokens written so far), so ones that look at earlier tokens fit in the same list.
    """

    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    greedy: bool = True
    generator: torch.Generator | None = None  # on the CPU, where the draw is made

    @classmethod
    def drawing(
        cls,
        temperature: float,
        top_p: float,
        generator: torch.Generator,
        controls: Sequence[LogitsProcessor] = (),
    ) -> Sampler:
        """Sampling at `temperature` from the smallest set of tokens holding `top_p` of the mass,
        after `controls` (repetition control) have had their say."""
        processors = LogitsProcessorList([*controls, TemperatureLogitsWarper(float(temperature))])
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        return cls(processors, greedy=False, generator=generator)

    def pick(self, token_ids: Sequence[int], logits: torch.Tensor) -> int:
        """The next token after `token_ids`, given the last position's `logits` [vocab]."""
        scores = logits[None]
        if self.processors:
            input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=logits.device)
            scores = self.processors(input_ids, scores.float())
        if self.greedy:
            return int(scores.argmax())
        probs = torch.softmax(scores[0], dim=-1)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))
