"""How the next token is picked from the last logits: transformers' logits processors, then
argmax (greedy) or one draw from a caller-seeded generator (sampling that replays exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class Sampler:
    """Processors run in order on the scores; greedy takes the argmax, otherwise one is drawn.

    Processors see the token ids their decoder hands over (the turn's prompt and the tokens
    written so far), so ones that look at earlier tokens fit in the same list.
    """

    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    greedy: bool = True
    generator: torch.Generator | None = None  # on the CPU, where the draw is made

    @classmethod
    def drawing(cls, temperature: float, top_p: float, generator: torch.Generator) -> Sampler:
        """Sampling at `temperature` from the smallest set of tokens holding `top_p` of the mass."""
        processors = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))])
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
