"""A stream as a multi-round dialogue: the instruction, user turns of records, commentary turns.

The pieces between turns are read off the model's own chat template by rendering a
conversation of sentinel messages and cutting around the sentinels, so any template works
without knowing its syntax. Models without a template get a plain-text dialogue.
"""

from __future__ import annotations

from dataclasses import dataclass

_SYSTEM, _USER, _ASSISTANT, _USER2 = (f"QZXSENTINEL{i}QZX" for i in range(4))

DEFAULT_INSTRUCTION = (
    "You summarize server logs for an on-call engineer. Reply with one short plain-English "
    "sentence per batch of lines, never by copying log lines."
)
# Closes every user turn: small models copy log lines unless asked a question right there.
DEFAULT_REQUEST = "What is going on in the lines above? One sentence."


@dataclass(frozen=True)
class Prompt:
    """What the model is told: the instruction (pinned in the cache) and the request that
    closes every user turn (empty for none). A saved state holds both and must match them."""

    instruction: str = DEFAULT_INSTRUCTION
    request: str = DEFAULT_REQUEST


@dataclass(frozen=True)
class ChatFormat:
    """The literal text around each part of the dialogue."""

    before_instruction: str
    first_user_open: str  # after the instruction, before the first records
    commentary_open: str  # closes the user turn and opens the assistant's
    next_user_open: str  # closes the commentary and opens the next user turn

    def instruction_text(self, instruction: str) -> str:
        return self.before_instruction + instruction

    @classmethod
    def plain(cls) -> ChatFormat:
        return cls("", "\n\n", "\nCommentary:", "\n\n")

    @classmethod
    def from_tokenizer(cls, tokenizer: object) -> ChatFormat:
        if not getattr(tokenizer, "chat_template", None):
            return cls.plain()
        try:
            return _from_template(tokenizer, with_system=True)
        except Exception:  # templates that reject a system turn raise their own errors
            return _from_template(tokenizer, with_system=False)


def _from_template(tokenizer: object, with_system: bool) -> ChatFormat:
    messages = [
        {"role": "user", "content": _USER},
        {"role": "assistant", "content": _ASSISTANT},
        {"role": "user", "content": _USER2},
    ]
    if with_system:
        messages.insert(0, {"role": "system", "content": _SYSTEM})
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(
        messages[:-2], tokenize=False, add_generation_prompt=True
    )
    before_user, rest = text.split(_USER, 1)
    _, commentary_open = prompt.split(_USER, 1)
    next_user_open = rest.split(_ASSISTANT, 1)[1].split(_USER2, 1)[0]
    if with_system:
        before, first_user_open = before_user.split(_SYSTEM, 1)
    else:  # the instruction becomes plain text ahead of the first user turn
        before, first_user_open = "", "\n\n" + before_user
    return ChatFormat(before, first_user_open, commentary_open, next_user_open)
