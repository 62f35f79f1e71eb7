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
        return list(self.by_role().values())

    def by_role(self) -> dict[str, str]:
        """Each topic a worker needs under what it is for ("input", "output", "dead-letter")."""
        roles = {"input": self.input, "output": self.output, "dead-letter": self.dead_letter}
        return {role: name for role, name in roles.items() if name}
