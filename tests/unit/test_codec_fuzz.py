"""The state decoder fuzzed: whatever bytes come in, the outcome is a state or a StateError.

Each case starts from a valid encoded state and damages it: random bytes, bit flips,
truncations and splices of the manifest (resealed with a valid checksum or not), a tree edit
of the manifest (a field deleted, an extra key, any field of any wrong type, negative and
huge numbers, nested garbage), a forged tensor entry whose block is rehashed so that it reaches
the dtype and shape checks, damaged blocks, and damaged export files. A decoded state must
hold exactly the bytes its blocks hold and re-encode as it is.

Cases are seeded per (seed, index), so a failure names the case that reproduces it. The
default run is 10^5 cases; run more by hand with
`STREAMSINK_FUZZ_CASES=1000000 STREAMSINK_FUZZ_SEED=7 pytest tests/unit/test_codec_fuzz.py`,
or one case with `STREAMSINK_FUZZ_FIRST=<index> STREAMSINK_FUZZ_CASES=1`.
"""

from __future__ import annotations

import contextlib
import os
import random
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from cache_store.codec import DTYPE_SIZES, block_id, decode_state, encode_state, read_manifest
from cache_store.exceptions import StateError
from cache_store.export import export_state, import_state
from cache_store.state import Expected, StreamState
from tests.state_mutations import HUGE, NUMBERS, damage_bytes, edit_tree

CASES = int(os.environ.get("STREAMSINK_FUZZ_CASES", 100_000))
SEED = int(os.environ.get("STREAMSINK_FUZZ_SEED", 0))
FIRST = int(os.environ.get("STREAMSINK_FUZZ_FIRST", 0))
FINGERPRINT = "ab12" * 8
WRITTEN_WITH = {
    "dtype": "float32",
    "rope": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0},
    "layer_types": ["full_attention", "sliding_attention"],
    "cache_capacity": 16,
}
READERS = [
    None,
    FINGERPRINT,
    "ffff",
    Expected(FINGERPRINT, WRITTEN_WITH),
    Expected(FINGERPRINT, {**WRITTEN_WITH, "rope": {"rope_type": "default"}}),
]


def _base_states() -> list[StreamState]:
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 4, generator=generator)
    meta = {
        "kind": "streamsink.session/1",
        "layout": {"capacity": 16, "sinks": 4, "slots": [0, 1, 2]},
        "counters": {"next_offset": 2**40, "skipped": {}, "turn_open": True},
        "text": "données — 流",
        "raw": b"\x00\xff",
        "nothing": None,
    }
    return [
        StreamState(
            "stream-1",
            FINGERPRINT,
            {
                "keys": keys,
                "values": keys.clone(),  # the same block twice
                "ids": torch.arange(5),
                "flags": torch.tensor([True, False, True]),
                "empty": torch.zeros(0, 2, dtype=torch.float16),
                "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
            },
            meta,
            WRITTEN_WITH,
        ),
        StreamState("s", FINGERPRINT, {"t": torch.arange(6, dtype=torch.int8)}, {}),
    ]


@dataclass(frozen=True)
class Base:
    manifest: bytes
    envelope: dict[str, Any]
    body: bytes
    blocks: dict[str, bytes]
    export: bytes


def _bases() -> list[Base]:
    bases = []
    for state in _base_states():
        encoded = encode_state(state)
        envelope = msgpack.unpackb(encoded.manifest)
        bases.append(
            Base(
                encoded.manifest,
                envelope,
                envelope["body"],
                {bid: bytes(data) for bid, data in encoded.blocks.items()},
                export_state(state, "scope-1"),
            )
        )
    return bases


BASES = _bases()


def _seal(body: bytes, envelope: dict[str, Any]) -> bytes:
    """The manifest resealed with the checksum its format version computes."""
    checksum = block_id(body, envelope["version"])
    return msgpack.packb({**envelope, "body": body, "checksum": checksum})


def _forge_entry(rng: random.Random, base: Base) -> tuple[bytes, dict[str, bytes]]:
    """A tensor entry rewritten with any dtype, shape and bytes, its block renamed to match:
    only the entry's own checks stand between it and a tensor."""
    body = msgpack.unpackb(base.body)
    blocks = dict(base.blocks)
    entry = rng.choice(body["tensors"])
    dtype = rng.choice(list(DTYPE_SIZES))
    itemsize = DTYPE_SIZES[dtype]
    shape = [rng.randrange(4) for _ in range(rng.randrange(4))]
    if rng.random() < 0.3:
        shape.insert(rng.randrange(len(shape) + 1), rng.choice([0, *HUGE]))
    if rng.random() < 0.1:
        shape = [1] * rng.choice([65, 200, 1000])
    count = 1
    for size in shape:
        count *= size
    data = rng.randbytes(count * itemsize) if count * itemsize < 4096 else rng.randbytes(16)
    nbytes = count * itemsize if rng.random() < 0.8 else rng.choice([len(data), *NUMBERS])
    block = block_id(data)
    blocks[block] = data
    entry.update(dtype=dtype, shape=shape, nbytes=nbytes, block=block)
    return _seal(msgpack.packb(body), base.envelope), blocks


def _damage_blocks(rng: random.Random, blocks: dict[str, bytes]) -> dict[str, bytes]:
    blocks = dict(blocks)
    name = rng.choice(sorted(blocks))
    op = rng.randrange(4)
    if op == 0:
        del blocks[name]
    elif op == 1:
        blocks[name] = damage_bytes(rng, blocks[name])
    elif op == 2:
        blocks[name] = blocks[rng.choice(sorted(blocks))]
    else:
        blocks[name] = b""
    return blocks


@dataclass(frozen=True)
class Case:
    what: str
    manifest: bytes = b""
    blocks: dict[str, bytes] | None = None
    export: bytes | None = None
    stream_id: str | None = None
    fingerprint: str | Expected | None = None


def make_case(seed: int, index: int) -> Case:
    rng = random.Random(seed * 1_000_003 + index)
    while True:
        try:
            return _make_case(rng)
        except (OverflowError, ValueError):  # an edit msgpack cannot pack: draw another
            continue


def _make_case(rng: random.Random) -> Case:
    base = rng.choice(BASES)
    stream_id = rng.choice([None, None, "stream-1", "s"])
    fingerprint = rng.choice(READERS)
    kind = rng.randrange(8)
    if kind == 0:
        raw = rng.randbytes(rng.randrange(64))
        if rng.random() < 0.5:
            raw = base.manifest[: rng.randrange(len(base.manifest))] + raw
        return Case("random bytes", raw, base.blocks, None, stream_id, fingerprint)
    if kind == 1:
        manifest = damage_bytes(rng, base.manifest)
        return Case("damaged manifest", manifest, base.blocks, None, stream_id, fingerprint)
    if kind == 2:
        manifest = _seal(damage_bytes(rng, base.body), base.envelope)
        return Case("damaged body, resealed", manifest, base.blocks, None, stream_id, fingerprint)
    if kind == 3:
        envelope = edit_tree(rng, msgpack.unpackb(base.manifest))
        manifest = msgpack.packb(envelope)
        return Case("edited envelope", manifest, base.blocks, None, stream_id, fingerprint)
    if kind in (4, 5):
        body = msgpack.unpackb(base.body)
        for _ in range(rng.choice([1, 1, 2, 3])):
            body = edit_tree(rng, body)
        manifest = _seal(msgpack.packb(body), base.envelope)
        blocks = _damage_blocks(rng, base.blocks) if rng.random() < 0.2 else base.blocks
        return Case("edited body, resealed", manifest, blocks, None, stream_id, fingerprint)
    if kind == 6:
        if rng.random() < 0.5:
            manifest, blocks = _forge_entry(rng, base)
            return Case("forged entry", manifest, blocks, None, stream_id, fingerprint)
        blocks = _damage_blocks(rng, base.blocks)
        return Case("damaged blocks", base.manifest, blocks, None, stream_id, fingerprint)
    if rng.random() < 0.5:
        export = damage_bytes(rng, base.export)
    else:
        export = msgpack.packb(edit_tree(rng, msgpack.unpackb(base.export)))
    return Case("damaged export", export=export)


def decode(case: Case) -> StreamState:
    """The case through the decoder's entry points; StateError if it is refused."""
    if case.export is not None:
        return import_state(case.export)[0]
    manifest = read_manifest(case.manifest, case.stream_id)
    return decode_state(manifest, case.blocks or {}, case.fingerprint)


def _check_decoded(case: Case, state: StreamState) -> None:
    """A state that decodes holds exactly the bytes of its blocks, and saves again as it is."""
    for tensor in state.tensors.values():
        assert tensor.is_contiguous()
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        if tensor.dtype == torch.bool and tensor.numel():
            assert tensor.view(torch.uint8).max() <= 1
    again = read_manifest(encode_state(state).manifest)
    assert msgpack.packb(again.meta) == msgpack.packb(state.meta)
    assert msgpack.packb(again.written_with) == msgpack.packb(state.written_with)


def _run(cases: range, check: Callable[[Case, StreamState], None]) -> dict[str, str]:
    failures: dict[str, str] = {}
    for index in cases:
        case = make_case(SEED, index)
        try:
            state = decode(case)
        except StateError:
            continue
        except Exception as error:  # noqa: BLE001 - any other outcome is the defect sought
            failures.setdefault(
                f"{type(error).__name__} on {case.what}",
                f"case {index} (STREAMSINK_FUZZ_SEED={SEED}): {str(error)[:200]}",
            )
            continue
        try:
            check(case, state)
        except Exception as error:  # noqa: BLE001
            failures.setdefault(
                f"decoded state unusable ({type(error).__name__}) on {case.what}",
                f"case {index} (STREAMSINK_FUZZ_SEED={SEED}): {str(error)[:200]}",
            )
    return failures


def test_every_damaged_state_is_refused_with_a_state_error() -> None:
    failures = _run(range(FIRST, FIRST + CASES), _check_decoded)
    assert not failures, "\n".join(f"{what}: {where}" for what, where in failures.items())


def test_decoding_allocates_no_more_than_the_bytes_it_was_given() -> None:
    """Python-side allocations (msgpack objects, block copies) traced over a sample of cases;
    torch's own allocations are only made from block bytes whose length has been checked."""
    tracemalloc.start()
    try:
        worst = 0.0
        for index in range(FIRST, FIRST + min(CASES, 2000)):
            case = make_case(SEED, index)
            given = len(case.manifest) + sum(map(len, (case.blocks or {}).values()))
            given += len(case.export or b"")
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            with contextlib.suppress(StateError):
                decode(case)
            worst = max(worst, (tracemalloc.get_traced_memory()[1] - before) / (given + 4096))
    finally:
        tracemalloc.stop()
    assert worst < 64
