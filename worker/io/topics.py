"""The worker's three topics: records in, commentary out, records set aside."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_INPUT_TOPIC = "streamsink-input"
DEFAULT_OUTPUT_TOPIC = "streamsink-commentary"
DEFAULT_DEAD_LETTER_TOPIC = "streamsink-dead-letter"


@dataclass(frozen=True)
class TopicNames:
    input: str = DEFAULT_INPUT_TOPIC
    output: str = DEFAULT_OUTPUT_TOPIC
    dead_letter: str | None = DEFAULT_DEAD_LETTER_TOPIC  # None: bad records are only logged

    def all(self) -> list[str]:
        """The topics a worker needs, in the order they are created and described."""
        return [self.input, self.output, *([self.dead_letter] if self.dead_letter else [])]
