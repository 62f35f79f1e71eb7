"""The state format: bit-exact round trips, dedup by content, and every kind of damage detected."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable
from typing import Any

import blake3
import msgpack
import pytest
import torch

from cache_store.codec import (
    DTYPE_SIZES,
    FORMAT_VERSION,
    MAX_META_DEPTH,
    EncodedState,
    block_id,
    decode_state,
    encode_state,
    read_manifest,
    tensor_ref,
)
from cache_store.exceptions import (
    StateCorruptError,
    StateError,
    StateForeignError,
    StateVersionError,
)
from cache_store.export import export_state, import_state
from cache_store.state import BlockRef, Expected, StreamState

FINGERPRINT = "ab12" * 8


def _state(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> StreamState:
    return StreamState("stream-1", FINGERPRINT, tensors, meta or {"step": 3})


def _round_trip(state: StreamState) -> StreamState:
    encoded = encode_state(state)
    return decode_state(read_manifest(encoded.manifest), encoded.blocks)


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_bit_exact(decoded: torch.Tensor, original: torch.Tensor) -> None:
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    assert _bits(decoded) == _bits(original)


def _random_bits(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, subnormals, -0.0), not just well-behaved values."""
    generator = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = itemsize * max(1, torch.Size(shape).numel())
    raw = torch.randint(0, 256, (count,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype)[: torch.Size(shape).numel()].reshape(shape)


def _rewrite(manifest: bytes, edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> bytes:
    """Apply `edit(envelope, body)` and re-seal the manifest with a valid checksum."""
    envelope = msgpack.unpackb(manifest)
    body = msgpack.unpackb(envelope["body"])
    edit(envelope, body)
    envelope["body"] = msgpack.packb(body)
    envelope["checksum"] = _hash(envelope["body"], envelope["version"])
    return msgpack.packb(envelope)


def _hash(data: bytes, version: int = FORMAT_VERSION) -> str:
    """Block ids and manifest checksums: blake2b-128 in format version 1, BLAKE3-128 since."""
    if version == 1:
        return hashlib.blake2b(data, digest_size=16).hexdigest()
    return blake3.blake3(data).hexdigest(length=16)


@pytest.fixture
def encoded() -> EncodedState:
    tensors = {"keys": torch.arange(12, dtype=torch.float32).reshape(3, 4), "ids": torch.arange(5)}
    return encode_state(_state(tensors))


@pytest.mark.parametrize("dtype_name", sorted(DTYPE_SIZES))
def test_every_supported_dtype_round_trips_bit_exactly(dtype_name: str) -> None:
    original = _random_bits(getattr(torch, dtype_name), (2, 3, 5))
    decoded = _round_trip(_state({"t": original})).tensors["t"]
    _assert_bit_exact(decoded, original)


def test_bfloat16_nan_payloads_survive() -> None:
    # quiet NaN with payload, negative NaN (0xFF81), +inf, -0.0 (0x8000), smallest subnormal
    patterns = torch.tensor([0x7FC1, -0x7F, 0x7F80, -0x8000, 0x0001], dtype=torch.int16)
    original = patterns.view(torch.bfloat16)
    _assert_bit_exact(_round_trip(_state({"t": original})).tensors["t"], original)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2)])
def test_zero_dim_and_empty_tensors_round_trip(shape: tuple[int, ...]) -> None:
    original = torch.full(shape, 2.5, dtype=torch.float16)
    _assert_bit_exact(_round_trip(_state({"t": original})).tensors["t"], original)


def test_non_contiguous_input_round_trips_by_value() -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(4, 12)
    views = {"transposed": base.t(), "strided": base[:, ::3], "offset": base[1:, 2:5]}
    decoded = _round_trip(_state(dict(views))).tensors
    for name, view in views.items():
        assert not view.is_contiguous()
        assert torch.equal(decoded[name], view)
        assert decoded[name].is_contiguous()


def test_decoded_tensors_are_writable_and_unshared() -> None:
    same = torch.ones(4, 4, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = _round_trip(_state({"keys": same, "values": same.clone()})).tensors
    decoded["keys"].add_(1)
    assert torch.equal(decoded["values"], same)
    assert decoded["keys"].data_ptr() != decoded["values"].data_ptr()


def test_tensor_order_and_meta_round_trip() -> None:
    meta = {
        "layout": {"capacity": 64, "sinks": 4},
        "counters": {"next_offset": 2**40, "skipped": {}, "turn_open": True},
        "text": "données — 流",
        "ratio": 0.1,
        "nothing": None,
        "items": [1, -2, [3.5, "x"], {"k": False}],
        "raw": b"\x00\xff",
    }
    tensors = {name: torch.zeros(1) for name in ("z", "a", "m")}
    restored = _round_trip(_state(tensors, meta))
    assert restored.meta == meta
    assert list(restored.tensors) == ["z", "a", "m"]
    assert (restored.stream_id, restored.fingerprint) == ("stream-1", FINGERPRINT)


@pytest.mark.parametrize("meta", [{"pair": (1, 2)}, {"map": {1: "a"}}, {"obj": object()}])
def test_meta_that_would_not_round_trip_is_refused(meta: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="meta of stream 'stream-1'"):
        encode_state(_state({}, meta))


def test_unsupported_tensor_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="complex64"):
        encode_state(_state({"c": torch.zeros(2, dtype=torch.complex64)}))


def test_identical_tensors_share_one_block_named_by_content_hash() -> None:
    tensor = torch.arange(6, dtype=torch.int64)
    encoded = encode_state(_state({"a": tensor, "b": tensor.clone(), "c": tensor + 1}))
    assert len(encoded.blocks) == 2
    data = _bits(tensor)
    block = _hash(data)
    assert encoded.blocks[block] == data
    entries = {entry.name: entry for entry in read_manifest(encoded.manifest).tensors}
    assert entries["a"].block == entries["b"].block == block != entries["c"].block


def test_manifest_describes_each_tensor(encoded: EncodedState) -> None:
    manifest = read_manifest(encoded.manifest)
    assert manifest.version == FORMAT_VERSION
    keys = manifest.tensors[0]
    assert (keys.name, keys.dtype, keys.shape, keys.nbytes) == ("keys", "float32", (3, 4), 48)
    assert manifest.block_ids == frozenset(encoded.blocks)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda m: m[: len(m) // 2], id="truncated"),
        pytest.param(lambda m: b"\xc1garbage" + m, id="garbage"),
        pytest.param(lambda m: b"", id="empty"),
    ],
)
def test_damaged_manifest_is_corrupt(encoded: EncodedState, damage: Callable) -> None:
    with pytest.raises(StateCorruptError, match="stream 'stream-1' is corrupt"):
        read_manifest(damage(encoded.manifest), "stream-1")


def test_altered_meta_fails_the_manifest_checksum(encoded: EncodedState) -> None:
    envelope = msgpack.unpackb(encoded.manifest)
    envelope["body"] = envelope["body"].replace(b"step\x03", b"step\x04")
    with pytest.raises(StateCorruptError, match="checksum"):
        read_manifest(msgpack.packb(envelope))


def test_wrong_magic_is_corrupt(encoded: EncodedState) -> None:
    manifest = _rewrite(encoded.manifest, lambda envelope, body: envelope.update(magic="other"))
    with pytest.raises(StateCorruptError, match="not a streamsink state"):
        read_manifest(manifest)


@pytest.mark.parametrize(
    ("version", "error"),
    [(FORMAT_VERSION + 1, StateVersionError), (0, StateCorruptError), (True, StateCorruptError)],
)
def test_format_version_is_checked_before_the_body(version: Any, error: type) -> None:
    envelope = {"magic": "streamsink-state", "version": version, "body": b"not msgpack \xc1"}
    with pytest.raises(error, match="version"):
        read_manifest(msgpack.packb(envelope))


def test_newer_format_version_says_how_to_fix() -> None:
    envelope = {"magic": "streamsink-state", "version": FORMAT_VERSION + 1}
    with pytest.raises(StateVersionError, match="upgrade streamsink"):
        read_manifest(msgpack.packb(envelope), "stream-1")


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("dtype", "complex32", "unknown dtype"),
        ("block", "../../etc/passwd", "invalid block id"),
        ("nbytes", 47, "claims 47 bytes"),
        ("shape", [3, -4], "invalid shape"),
        ("name", 5, "'name' is missing"),
    ],
)
def test_inconsistent_tensor_entry_is_corrupt(
    encoded: EncodedState, field: str, value: Any, problem: str
) -> None:
    manifest = _rewrite(
        encoded.manifest, lambda env, body: body["tensors"][0].update({field: value})
    )
    with pytest.raises(StateCorruptError, match=problem):
        read_manifest(manifest)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# Found by tests/unit/test_codec_fuzz.py: each of these raised another error, or decoded into a
# state that could not be saved again.
@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        pytest.param({"deep": _nested(480)}, "nests deeper than", id="deep"),  # RecursionError
        pytest.param({"ext": msgpack.ExtType(5, b"x")}, "is a ExtType", id="ext-type"),
        pytest.param({"keys": {b"raw": 1}}, "has key b'raw'", id="bytes-key"),
    ],
)
def test_meta_the_encoder_would_refuse_is_corrupt(
    encoded: EncodedState, meta: dict[str, Any], problem: str
) -> None:
    manifest = _rewrite(encoded.manifest, lambda env, body: body.update(meta=meta))
    with pytest.raises(StateCorruptError, match=problem):
        read_manifest(manifest)


def test_meta_nested_too_deep_is_refused_when_saved() -> None:
    encode_state(_state({}, {"deep": _nested(MAX_META_DEPTH - 1)}))
    with pytest.raises(TypeError, match="nests deeper than"):
        encode_state(_state({}, {"deep": _nested(MAX_META_DEPTH)}))


@pytest.mark.parametrize("shape", [[0, 2**63], [3, 2**63 - 1, 0], [0, 2**62, 2**62]])
def test_empty_tensor_of_impossible_shape_is_corrupt(
    encoded: EncodedState, shape: list[int]
) -> None:
    # torch.empty raised TypeError or RuntimeError on these, although they hold no element
    manifest = _rewrite(
        encoded.manifest, lambda env, body: body["tensors"][0].update(shape=shape, nbytes=0)
    )
    with pytest.raises(StateCorruptError, match="impossibly large shape"):
        read_manifest(manifest)


def test_bool_block_holding_other_values_is_corrupt(encoded: EncodedState) -> None:
    data = bytes([1, 0, 2])
    manifest = _rewrite(
        encoded.manifest,
        lambda env, body: body["tensors"][0].update(
            dtype="bool", shape=[3], nbytes=3, block=block_id(data)
        ),
    )
    with pytest.raises(StateCorruptError, match="bool values other than 0 and 1"):
        decode_state(read_manifest(manifest), {**encoded.blocks, block_id(data): data})


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda export: export.pop("blocks"), id="no-blocks"),  # KeyError
        pytest.param(lambda export: export.update(blocks="x"), id="blocks-str"),  # AttributeError
        pytest.param(lambda export: export.update(manifest=1.5), id="manifest-float"),  # TypeError
        pytest.param(lambda export: export.update(scope=None), id="no-scope"),
        pytest.param(
            lambda export: export["blocks"].update({next(iter(export["blocks"])): 7}),
            id="block-int",
        ),
    ],
)
def test_damaged_export_file_is_corrupt(edit: Callable[[dict[str, Any]], None]) -> None:
    state = _state({"keys": torch.ones(3)})
    assert import_state(export_state(state, "scope-1"))[1] == "scope-1"
    export = msgpack.unpackb(export_state(state, "scope-1"))
    edit(export)
    with pytest.raises(StateCorruptError, match="export is damaged"):
        import_state(msgpack.packb(export))


def test_manifest_of_another_stream_is_corrupt(encoded: EncodedState) -> None:
    with pytest.raises(StateCorruptError, match="belongs to stream 'stream-1'"):
        read_manifest(encoded.manifest, "stream-2")


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        pytest.param(lambda data: None, "is missing", id="missing"),
        pytest.param(lambda data: data[:-1], "has 47 bytes, expected 48", id="short"),
        pytest.param(lambda data: bytes([data[0] ^ 1]) + data[1:], "fails its checksum", id="flip"),
    ],
)
def test_bad_block_is_corrupt_and_names_stream_and_tensor(
    encoded: EncodedState, edit: Callable[[bytes], bytes | None], problem: str
) -> None:
    manifest = read_manifest(encoded.manifest)
    blocks = dict(encoded.blocks)
    first = manifest.tensors[0].block
    edited = edit(blocks.pop(first))
    if edited is not None:
        blocks[first] = edited
    with pytest.raises(StateCorruptError, match=f"stream 'stream-1'.*'keys' {problem}"):
        decode_state(manifest, blocks)


def test_foreign_fingerprint_names_both_and_how_to_fix(encoded: EncodedState) -> None:
    manifest = read_manifest(encoded.manifest)
    with pytest.raises(StateForeignError) as raised:
        decode_state(manifest, {}, expected_fingerprint="ffff")
    message = str(raised.value)
    assert FINGERPRINT in message and "ffff" in message
    assert "another model" in message and "--model" in message
    assert decode_state(manifest, encoded.blocks, FINGERPRINT).fingerprint == FINGERPRINT


WRITTEN_WITH = {
    "dtype": "float32",
    "rope": {"rope_type": "default", "rope_theta": 10000.0},
    "layer_types": ["full_attention", "sliding_attention"],
    "cache_capacity": 128,
}


@pytest.fixture
def written() -> EncodedState:
    tensors = {"keys": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    return encode_state(StreamState("stream-1", FINGERPRINT, tensors, {}, WRITTEN_WITH))


def test_what_a_state_was_written_with_round_trips(written: EncodedState) -> None:
    manifest = read_manifest(written.manifest)
    assert manifest.written_with == WRITTEN_WITH
    expected = Expected(FINGERPRINT, WRITTEN_WITH)
    assert decode_state(manifest, written.blocks, expected).written_with == WRITTEN_WITH


@pytest.mark.parametrize(
    ("running", "named"),
    [
        ({"dtype": "bfloat16"}, "dtype='float32', but this worker runs dtype='bfloat16'"),
        (
            {"rope": {"rope_type": "default", "rope_theta": 5e5}},
            "rope.rope_theta=10000.0, but this worker runs rope.rope_theta=500000.0",
        ),
        (
            {"rope": {"rope_type": "default", "rope_theta": 10000.0, "factor": 4.0}},
            "written with no rope.factor, but this worker runs rope.factor=4.0",
        ),
        (
            {"layer_types": ["full_attention", "full_attention"]},
            "layer_types[1]='sliding_attention', but this worker runs "
            "layer_types[1]='full_attention'",
        ),
        (
            {"layer_types": ["full_attention"]},
            "layer_types=['full_attention', 'sliding_attention'], but this worker runs "
            "layer_types=['full_attention']",
        ),
        ({"cache_capacity": 256}, "cache_capacity=128, but this worker runs cache_capacity=256"),
    ],
)
def test_state_written_with_other_settings_is_refused_naming_the_field(
    written: EncodedState, running: dict[str, Any], named: str
) -> None:
    expected = Expected(FINGERPRINT, {**WRITTEN_WITH, **running}, fix="run it like so")
    with pytest.raises(StateForeignError, match=re.escape(named)) as raised:
        decode_state(read_manifest(written.manifest), {}, expected)  # before any block is read
    assert "'stream-1'" in str(raised.value) and "run it like so" in str(raised.value)


def test_what_a_state_does_not_record_is_left_to_the_fingerprint(written: EncodedState) -> None:
    older = read_manifest(_rewrite(written.manifest, lambda env, body: body.pop("written_with")))
    assert older.written_with == {}
    assert decode_state(older, written.blocks, Expected(FINGERPRINT, WRITTEN_WITH)).tensors
    with pytest.raises(StateForeignError, match="another model"):
        decode_state(older, written.blocks, Expected("ffff", WRITTEN_WITH))
    newer_reader = Expected(FINGERPRINT, {**WRITTEN_WITH, "recorded_later": 1})
    assert decode_state(read_manifest(written.manifest), written.blocks, newer_reader).tensors


def test_written_with_that_is_not_a_map_is_corrupt(written: EncodedState) -> None:
    manifest = _rewrite(written.manifest, lambda env, body: body.update(written_with=[1]))
    with pytest.raises(StateCorruptError, match="'written_with' is not a dict"):
        read_manifest(manifest)


def test_all_state_errors_share_one_base() -> None:
    for error in (StateCorruptError, StateVersionError, StateForeignError):
        assert issubclass(error, StateError)


def test_a_state_of_format_version_1_still_loads() -> None:
    """Version 1 named blocks by blake2b; a worker upgraded mid-stream restores such states."""
    tensor = torch.arange(6, dtype=torch.float32)
    data = _bits(tensor)
    block = _hash(data, version=1)
    entry = {"name": "t", "dtype": "float32", "shape": [6], "block": block, "nbytes": 24}
    body = {"stream_id": "stream-1", "fingerprint": FINGERPRINT, "meta": {}, "tensors": [entry]}
    packed = msgpack.packb(body)
    envelope = {"magic": "streamsink-state", "version": 1, "checksum": _hash(packed, 1)}
    manifest = read_manifest(msgpack.packb({**envelope, "body": packed}))
    assert torch.equal(decode_state(manifest, {block: data}).tensors["t"], tensor)
    with pytest.raises(StateCorruptError, match="fails its checksum"):
        decode_state(manifest, {block: data[:-4] + b"\0\0\0\0"})


def test_a_stored_tensor_is_named_by_its_block_without_its_bytes() -> None:
    kept, changed = torch.arange(8, dtype=torch.float32), torch.ones(4, dtype=torch.bfloat16)
    ref = tensor_ref(kept)
    encoded = encode_state(
        StreamState("stream-1", FINGERPRINT, {"changed": changed}, {}, stored={"kept": ref})
    )
    assert ref.block not in encoded.blocks and ref.block in encoded.block_ids
    assert encoded.block_ids == frozenset(encoded.blocks) | {ref.block}
    manifest = read_manifest(encoded.manifest)
    blocks = {**encoded.blocks, ref.block: _bits(kept)}
    decoded = decode_state(manifest, blocks, borrow=True)
    assert torch.equal(decoded.tensors["kept"], kept)
    assert torch.equal(decoded.tensors["changed"], changed)
    assert decoded.stored == {"kept": ref, "changed": tensor_ref(changed)}


@pytest.mark.parametrize(
    "ref",
    [
        BlockRef("complex32", (2,), "0" * 32, 8),
        BlockRef("float32", (2,), "../etc", 8),
        BlockRef("float32", (2,), "0" * 32, 7),
    ],
)
def test_a_stored_tensor_that_names_no_valid_block_is_refused(ref: BlockRef) -> None:
    with pytest.raises(ValueError, match="stored tensor 'kept'"):
        encode_state(StreamState("stream-1", FINGERPRINT, {}, {}, stored={"kept": ref}))
