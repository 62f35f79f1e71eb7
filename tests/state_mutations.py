"""Ways to damage plain data and bytes, for the fuzz tests of saved states."""

from __future__ import annotations

import random
from typing import Any

import msgpack

from cache_store.codec import DTYPE_SIZES, block_id

HUGE = [2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
NUMBERS = [0, 1, -1, 2, 3, 7, 64, -(2**63), *HUGE, 0.5, -0.0, float("nan"), float("inf")]


def garbage(rng: random.Random, depth: int = 0) -> Any:
    """Any value msgpack can carry, from plain numbers to deep nests and extension types."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(NUMBERS)
    if kind == 3:
        return rng.choice(["", "x", "float32", "bool", "keys", "0" * 32, "é流", "\x00"])
    if kind == 4:
        return rng.randbytes(rng.randrange(40))
    if kind == 5:
        return rng.choice(list(DTYPE_SIZES))
    if kind == 6:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(8)))
    if kind == 7:
        return block_id(rng.randbytes(4))
    if kind == 8:
        return [garbage(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 9:
        return {str(rng.randrange(5)): garbage(rng, depth + 1) for _ in range(rng.randrange(4))}
    if kind == 10:
        nested: Any = rng.choice([0, "x", b""])
        for _ in range(rng.choice([10, 200, 480])):
            nested = [nested] if rng.random() < 0.5 else {"k": nested}
        return nested
    return [rng.choice(HUGE) for _ in range(rng.randrange(1, 80))]


def pick(rng: random.Random, tree: dict[str, Any]) -> tuple[Any, Any]:
    """A random (container, key) in a tree of dicts and lists: a walk down from the root that
    stops at each level with some chance, so every field of every depth gets its turn."""
    container: Any = tree
    key: Any = rng.choice(list(tree))
    while isinstance(container[key], dict | list) and container[key] and rng.random() < 0.7:
        container = container[key]
        key = rng.choice(list(container)) if isinstance(container, dict) else None
        key = rng.randrange(len(container)) if key is None else key
    return container, key


def edit_tree(rng: random.Random, tree: Any) -> Any:
    """One edit somewhere in the tree: replace, delete, add a key, or nudge a number."""
    if type(tree) is not dict or not tree or rng.random() < 0.03:
        return garbage(rng)
    container, key = pick(rng, tree)
    op = rng.randrange(6)
    if op == 0 and isinstance(container, dict):
        del container[key]
    elif op == 1 and isinstance(container, dict):
        container[rng.choice(["extra", "meta", "shape", b"bytes-key", "tensors"])] = garbage(rng)
    elif op == 2 and type(container[key]) is int:
        container[key] = rng.choice([-container[key], container[key] + 1, container[key] - 1])
    elif op == 3 and isinstance(container, list):
        container.insert(rng.randrange(len(container) + 1), garbage(rng))
    else:
        container[key] = garbage(rng)
    return tree


def damage_bytes(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return rng.randbytes(rng.randrange(8))
    data = bytearray(data)
    op = rng.randrange(5)
    if op == 0:
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1:
        del data[rng.randrange(len(data)) :]
    elif op == 2:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randrange(1, 16))
    elif op == 3:
        data[rng.randrange(len(data))] = rng.choice([0x00, 0xC1, 0xDC, 0xDD, 0xDF, 0xC6, 0xFF])
    else:
        start = rng.randrange(len(data))
        del data[start : start + rng.randrange(1, 16)]
    return bytes(data)
