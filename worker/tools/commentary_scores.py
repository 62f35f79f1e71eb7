"""How good a stream's commentary is, from text alone: repeats, loops, grounding, invention.

Pure functions of strings, so the figures are the same whether the commentary was just
written or read back from a dump, and they are tested without a model.

- A *repeat* is a commentary whose first 8 words equal an earlier one's in the same stream.
- A *loop* is a commentary in which some word 4-gram occurs 3 or more times.
- *Grounding* is the share of the covered lines' facts (numbers, identifiers, error words)
  that the commentary mentions.
- *Invention* is the share of the commentary's numbers and identifiers found nowhere in the
  stream's input up to the commentary's last line.

Timestamps are left out of the facts: every log line has one, and a summary should not
recite them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

REPEAT_WORDS = 8
LOOP_GRAM, LOOP_COUNT = 4, 3

_WORD = re.compile(r"[\w']+")
_TOKEN = re.compile(r"\S+")
_CLOCK = r"\d\d:\d\d(:\d\d)?([.,]\d+)?"
_TIMESTAMP = re.compile(rf"^(\d{{4}}-\d\d-\d\d([t ]{_CLOCK}(z|[+-]\d\d:?\d\d)?)?|{_CLOCK})$")
_POSSESSIVE = re.compile(r"'s$")
_MEASURE = re.compile(r"^\d+(\.\d+)?[a-z%]{0,3}$")  # 718ms, 87%, 2.5s: the number counts
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# An identifier mixes letters with digits or joins parts with - _ / . : (db-primary,
# /api/users/42, user_id, v2); plain words are not identifiers.
_IDENTIFIER = re.compile(r"^(?=.*[a-z])(?=.*(\d|\w[-_/.:]\w|^/))[\w/.:-]+$")
# Error words, each under one name so 'failed' and 'failure' count as one mention.
_ERROR_WORDS = {
    "error": re.compile(r"\berr(or)?s?\b"),
    "warn": re.compile(r"\bwarn(ing)?s?\b"),
    "fatal": re.compile(r"\b(fatal|critical|crash(ed|es)?)\b"),
    "fail": re.compile(r"\bfail(ed|ure|ures|ing|s)?\b"),
    "timeout": re.compile(r"\btime[ -]?outs?\b|\btimed out\b"),
    "refused": re.compile(r"\brefus(ed|al)\b"),
    "exception": re.compile(r"\bexceptions?\b"),
}
_STATUS = re.compile(r"(?<![\w.])[1-5]\d\d(?![\w.])")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def opening(text: str) -> tuple[str, ...]:
    """The words that decide whether a commentary repeats an earlier one."""
    return tuple(words(text)[:REPEAT_WORDS])


def loops(text: str) -> bool:
    """Whether some word 4-gram occurs 3 or more times: the model went round in a circle."""
    found = words(text)
    grams = Counter(tuple(found[i : i + LOOP_GRAM]) for i in range(len(found) - LOOP_GRAM + 1))
    return any(count >= LOOP_COUNT for count in grams.values())


def repeats(texts: Sequence[str]) -> list[bool]:
    """For each commentary of one stream in order: does it open like an earlier one?"""
    seen: set[tuple[str, ...]] = set()
    flags = []
    for text in texts:
        start = opening(text)
        flags.append(start in seen)
        seen.add(start)
    return flags


def named_facts(text: str) -> set[str]:
    """The numbers and identifiers of `text`, lower-cased, timestamps left out."""
    facts: set[str] = set()
    for raw in _TOKEN.findall(text.lower()):
        token = _POSSESSIVE.sub("", raw.strip("()[]{}<>,;!?\"'`")).rstrip(".:")
        if not token or _TIMESTAMP.match(token):
            continue
        if _IDENTIFIER.match(token) and not _MEASURE.match(token):
            facts.add(token)
        facts.update(n for n in _NUMBER.findall(token) if not _TIMESTAMP.match(n))
    return facts


def error_words(text: str) -> set[str]:
    """The error words of `text` by name, plus the HTTP error statuses (4xx, 5xx) it holds."""
    lowered = text.lower()
    found = {name for name, pattern in _ERROR_WORDS.items() if pattern.search(lowered)}
    found.update(code for code in _STATUS.findall(lowered) if code[0] in "45")
    return found


def mentions(text: str, fact: str) -> bool:
    """Whether `fact` occurs in `text` as a whole token (4999 in /api/users/4999, not in 49990)."""
    pattern = rf"(?<![\w.]){re.escape(fact)}(?!\w|\.\d)"
    return re.search(pattern, text.lower()) is not None


@dataclass(frozen=True)
class Grounding:
    """How a commentary stands to its lines: facts it could mention, did, and made up."""

    facts: int  # distinct facts of the covered lines
    mentioned: int  # of which the commentary names
    named: int  # numbers and identifiers the commentary names
    invented: int  # of which occur nowhere in the stream's input so far


def grounding(commentary: str, covered: str, seen: str) -> Grounding:
    """`covered`: the lines the commentary is about; `seen`: the stream's input up to them."""
    facts = named_facts(covered)
    errors = error_words(covered) - facts  # a 503 is one fact, named or as a status
    mentioned = sum(mentions(commentary, fact) for fact in facts)
    mentioned += len(errors & error_words(commentary))
    named = named_facts(commentary)
    invented = sum(not mentions(seen, fact) for fact in named)
    return Grounding(len(facts) + len(errors), mentioned, len(named), invented)


@dataclass(frozen=True)
class Scored:
    """One commentary of one stream, with what the scores need."""

    text: str
    covered: str
    seen: str


@dataclass(frozen=True)
class QualityReport:
    commentaries: int
    repeat_rate: float
    loop_rate: float
    grounding: float
    invention: float
    mean_words: float
    seconds_per_commentary: float | None  # None when scoring commentary written elsewhere

    def to_json_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        seconds = (
            "n/a" if self.seconds_per_commentary is None else f"{self.seconds_per_commentary:.2f} s"
        )
        return (
            f"commentaries {self.commentaries}  repeat {self.repeat_rate:.0%}  "
            f"loop {self.loop_rate:.0%}  grounding {self.grounding:.1%}  "
            f"invention {self.invention:.1%}  words {self.mean_words:.1f}  "
            f"time {seconds}/commentary"
        )


def score_streams(
    streams: Sequence[Sequence[Scored]], seconds_per_commentary: float | None = None
) -> QualityReport:
    """Figures over every stream's commentary; grounding and invention pool all mentions."""
    texts = [item.text for stream in streams for item in stream]
    repeated = sum(sum(repeats([item.text for item in stream])) for stream in streams)
    looped = sum(map(loops, texts))
    scores = [grounding(item.text, item.covered, item.seen) for s in streams for item in s]
    count = len(texts)
    return QualityReport(
        commentaries=count,
        repeat_rate=_share(repeated, count),
        loop_rate=_share(looped, count),
        grounding=_share(sum(g.mentioned for g in scores), sum(g.facts for g in scores)),
        invention=_share(sum(g.invented for g in scores), sum(g.named for g in scores)),
        mean_words=_share(sum(len(words(text)) for text in texts), count),
        seconds_per_commentary=seconds_per_commentary,
    )


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0
