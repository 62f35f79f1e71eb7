"""Key names. For key prefix P and a partition (or any other scope) S, all under hash tag {S}:

    P:{S}:epoch            owner token, INCR'd by each new owner of the partition
    P:{S}:offset           next input offset of the partition that the committed states cover
    P:{S}:outbox           list of output (commentary, dead letters) committed, not yet produced
    P:{S}:streams          set of stream ids with a state in this scope
    P:{S}:m:<stream>       the stream's manifest (codec format)
    P:{S}:bl:<stream>      set of the block ids the manifest names
    P:{S}:b:<stream>:<id>  immutable, content-addressed tensor blocks

plus P:streams, a hash stream id -> scope that admin commands use to find a stream. It is
written after each commit, so it is advisory: the scoped keys are the truth.
"""

from __future__ import annotations


def check_prefix(prefix: str) -> None:
    """A prefix with ':' or braces would break the hash tag, or collide with another scope."""
    if ":" in prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"key prefix {prefix!r} may not contain ':', '{{' or '}}'")


def index_key(prefix: str) -> str:
    return f"{prefix}:streams"


class ScopeKeys:
    """Key names of one scope."""

    def __init__(self, prefix: str, scope: str) -> None:
        self.scope = scope
        self.tag = f"{prefix}:{{{scope}}}"
        self.epoch = f"{self.tag}:epoch"
        self.offset = f"{self.tag}:offset"
        self.outbox = f"{self.tag}:outbox"
        self.streams = f"{self.tag}:streams"

    def manifest(self, stream_id: str) -> str:
        return f"{self.tag}:m:{stream_id}"

    def block_set(self, stream_id: str) -> str:
        return f"{self.tag}:bl:{stream_id}"

    def block_prefix(self, stream_id: str) -> str:
        return f"{self.tag}:b:{stream_id}:"
