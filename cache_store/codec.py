"""Pickle-free, versioned serialization of a StreamState into one manifest and raw blocks.

Each tensor's bytes form a block named by their content hash (BLAKE3, 128 bits, hex; format
version 1 used blake2b-128 and is still read), so a store writes only the blocks it does not
hold yet, identical tensors share one block, blocks never change, and the name doubles as the
checksum verified on decode. A state may also name a tensor by a block the store already holds
(`StreamState.stored`): a checkpoint carries only what changed.

The manifest is msgpack: an envelope {magic, version, checksum, body} around a msgpack body
{stream_id, fingerprint, written_with, meta, tensors: [{name, dtype, shape, block, nbytes}]}
(`written_with` came later within version 1: a body without it is a state saved before, read
as written with nothing in particular, which older readers ignore). The envelope lets a reader
reject a newer format before parsing its body; the checksum (the body's content hash, as for
blocks) makes a damaged meta an error instead of a silently different resume. Block bytes are
the tensor's C-contiguous elements in its own dtype, little-endian (the byte order of every
host torch runs on here). torch is imported only where tensors are made or read: reading a
manifest (what `streamsink streams` lists) needs none.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3
import msgpack

from cache_store.exceptions import StateCorruptError, StateForeignError, StateVersionError
from cache_store.state import BlockRef, Expected, StreamState

if TYPE_CHECKING:
    import torch

# 1: blocks and manifest body named by blake2b-128; 2: by BLAKE3-128; 3: as 2, written by a
# streamsink whose tensors an older reader would misread (a cache's keys at their stream
# positions), so that an older reader refuses it instead.
FORMAT_VERSION = 3
MAGIC = "streamsink-state"

# The dtypes the format stores, by the name a manifest gives them (torch's), and the bytes of
# one element.
DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_BLOCK_ID = re.compile(r"[0-9a-f]{32}\Z")
_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)
MAX_META_DEPTH = 32  # far deeper than any meta streamsink writes; bounds the decoder's work
# A tensor's extent in bytes, each empty dimension counted as one: what torch's stride and size
# arithmetic must hold in an int64, even for a tensor with no elements.
_MAX_EXTENT = 2**63 - 1
_CORRUPT_FIX = "delete the stream's state so the stream starts fresh, or restore it from a backup"


_ABSENT = object()  # a key one side of a comparison lacks


@dataclass(frozen=True)
class TensorEntry:
    """How to rebuild one named tensor, and which block holds its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    block: str
    nbytes: int

    def ref(self) -> BlockRef:
        return BlockRef(self.dtype, self.shape, self.block, self.nbytes)


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest; its blocks still have to be fetched and verified."""

    version: int
    stream_id: str
    fingerprint: str
    meta: Mapping[str, Any]
    tensors: tuple[TensorEntry, ...]
    written_with: Mapping[str, Any]

    @property
    def block_ids(self) -> frozenset[str]:
        """The blocks this state needs; a store keeps every block some manifest names."""
        return frozenset(entry.block for entry in self.tensors)


Buffer = bytes | memoryview  # a block's bytes; a memoryview of an exported tensor is not copied


@dataclass(frozen=True)
class EncodedState:
    """A state ready to store: the manifest, the bytes of the blocks it carries, by id, and
    the ids of every block the manifest names (those of `StreamState.stored` too)."""

    manifest: bytes
    blocks: dict[str, Buffer]
    block_ids: frozenset[str]


def block_id(data: Buffer, version: int = FORMAT_VERSION) -> str:
    """Content hash naming a block; equal bytes get equal ids, which is what dedups them."""
    return _HASHES[version](data)


def _blake2b(data: Buffer) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _blake3(data: Buffer) -> str:
    return blake3.blake3(data).hexdigest(length=16)


_HASHES: dict[int, Callable[[Buffer], str]] = {1: _blake2b, 2: _blake3, 3: _blake3}


def tensor_ref(tensor: torch.Tensor) -> BlockRef:
    """The block a store keeps `tensor` under once a state carrying it is saved."""
    data, dtype_name = _tensor_bytes(tensor, "a tensor")
    return BlockRef(dtype_name, tuple(tensor.shape), block_id(data), len(data))


def encode_state(state: StreamState) -> EncodedState:
    """Serialize a state; raises TypeError/ValueError for content the format cannot hold."""
    _require_str(state.stream_id, "stream_id")
    _require_str(state.fingerprint, "fingerprint")
    meta = dict(state.meta)
    _check_plain(meta, f"meta of stream {state.stream_id!r}")
    written_with = dict(state.written_with)
    _check_plain(written_with, f"written_with of stream {state.stream_id!r}")
    blocks: dict[str, Buffer] = {}
    entries: list[dict[str, Any]] = []
    for name, tensor in state.tensors.items():
        where = f"tensor {name!r} of stream {state.stream_id!r}"
        _require_str(name, where)
        data, dtype_name = _tensor_bytes(tensor, where)
        bid = block_id(data)
        blocks[bid] = data
        entries.append(_entry(name, BlockRef(dtype_name, tuple(tensor.shape), bid, len(data))))
    for name, ref in state.stored.items():
        if name not in state.tensors:
            _check_ref(ref, f"stored tensor {name!r} of stream {state.stream_id!r}")
            entries.append(_entry(name, ref))
    body = {
        "stream_id": state.stream_id,
        "fingerprint": state.fingerprint,
        "written_with": written_with,
        "meta": meta,
        "tensors": entries,
    }
    named = frozenset(entry["block"] for entry in entries)
    return EncodedState(_pack_envelope(body, state.stream_id), blocks, named)


def read_manifest(manifest: bytes, stream_id: str | None = None) -> Manifest:
    """Parse and validate a manifest; `stream_id`, when known, is named in errors and checked."""
    label = "state" if stream_id is None else f"state of stream {stream_id!r}"
    envelope = _unpack(manifest, label, "manifest")
    if type(envelope) is not dict or envelope.get("magic") != MAGIC:
        raise _corrupt(label, f"the manifest is not a streamsink state (no {MAGIC!r} magic)")
    version = _field(envelope, "version", int, label)
    if version > FORMAT_VERSION:
        raise StateVersionError(
            f"{label} was written in format version {version}, but this streamsink reads only "
            f"up to version {FORMAT_VERSION}; upgrade streamsink, or delete the stream's state "
            "so the stream starts fresh"
        )
    if version < 1:
        raise _corrupt(label, f"the manifest has impossible format version {version}")
    body = _field(envelope, "body", bytes, label)
    if _field(envelope, "checksum", str, label) != block_id(body, version):
        raise _corrupt(label, "the manifest fails its checksum")
    parsed = _parse_body(_unpack(body, label, "manifest body"), version, label)
    if stream_id is not None and parsed.stream_id != stream_id:
        raise _corrupt(label, f"the manifest belongs to stream {parsed.stream_id!r}")
    return parsed


def check_fingerprint(state: Manifest | StreamState, expected: str | Expected | None) -> None:
    """Refuse a state written by another model or with other settings, before any block is
    fetched; None accepts any state, a bare fingerprint checks only the model."""
    if expected is None:
        return
    if isinstance(expected, str):
        expected = Expected(expected, fix="run with the same --model that wrote it")
    label = f"state of stream {state.stream_id!r}"
    for name, running in expected.written_with.items():
        saved = state.written_with.get(name, _ABSENT)
        if saved is not _ABSENT and saved != running:
            path, saved, running = _first_difference(name, saved, running)
            raise StateForeignError(
                f"{label} was written with {_shown(path, saved)}, but this worker runs "
                f"{_shown(path, running)}; {expected.fix}, or delete the stream's state so the "
                "stream starts fresh"
            )
    if state.fingerprint != expected.fingerprint:
        raise StateForeignError(
            f"{label} was written by another model (fingerprint {state.fingerprint}), but this "
            f"worker runs fingerprint {expected.fingerprint}; {expected.fix}, or delete the "
            "stream's state so the stream starts fresh"
        )


def decode_state(
    manifest: Manifest,
    blocks: Mapping[str, Buffer],
    expected_fingerprint: str | Expected | None = None,
    borrow: bool = False,
) -> StreamState:
    """Rebuild the state, verifying every block; its `stored` names each tensor's block.

    Tensors are fresh, writable and unshared; with `borrow`, they are read-only views of
    `blocks` instead (no copy), for a caller that copies them at once, as a restore does.
    """
    check_fingerprint(manifest, expected_fingerprint)
    label = f"state of stream {manifest.stream_id!r}"
    verified: set[str] = set()
    tensors: dict[str, torch.Tensor] = {}
    for entry in manifest.tensors:
        data = blocks.get(entry.block)
        what = f"block {entry.block} of tensor {entry.name!r}"
        if data is None:
            raise _corrupt(label, f"{what} is missing")
        if len(data) != entry.nbytes:
            raise _corrupt(label, f"{what} has {len(data)} bytes, expected {entry.nbytes}")
        if entry.block not in verified:
            if block_id(data, manifest.version) != entry.block:
                raise _corrupt(label, f"{what} fails its checksum")
            verified.add(entry.block)
        if entry.dtype == "bool" and bytes(data).translate(None, b"\x00\x01"):
            raise _corrupt(label, f"{what} holds bool values other than 0 and 1")
        tensors[entry.name] = _tensor_from(data, entry, borrow)
    return StreamState(
        manifest.stream_id,
        manifest.fingerprint,
        tensors,
        copy.deepcopy(manifest.meta),
        copy.deepcopy(manifest.written_with),
        stored={entry.name: entry.ref() for entry in manifest.tensors},
    )


def _tensor_bytes(tensor: Any, where: str) -> tuple[Buffer, str]:
    """Raw element bytes; going through a uint8 view keeps bfloat16 and NaN payloads exact.

    A contiguous CPU tensor is not copied: its bytes are a view, valid while it is unchanged.
    """
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        raise TypeError(f"{where} must be a dense torch.Tensor, got {type(tensor).__name__}")
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    if dtype_name not in DTYPE_SIZES:
        raise ValueError(
            f"{where} has dtype {dtype_name}, which the state format does not store; "
            f"convert it to one of {', '.join(DTYPE_SIZES)}"
        )
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b"", dtype_name
    return memoryview(flat.view(torch.uint8).numpy()), dtype_name


def _tensor_from(data: Buffer, entry: TensorEntry, borrow: bool) -> torch.Tensor:
    """A tensor owning a private copy of `data`, or with `borrow` a read-only view of it."""
    import torch

    dtype = getattr(torch, entry.dtype)
    if not data:  # torch.frombuffer refuses empty buffers
        return torch.empty(entry.shape, dtype=dtype)
    if borrow:
        with warnings.catch_warnings():  # torch warns that the view is read-only: it is meant to
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(data, dtype=torch.uint8)
    else:
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return flat.view(dtype).reshape(entry.shape)


def _entry(name: str, ref: BlockRef) -> dict[str, Any]:
    return {
        "name": name,
        "dtype": ref.dtype,
        "shape": list(ref.shape),
        "block": ref.block,
        "nbytes": ref.nbytes,
    }


def _check_ref(ref: Any, where: str) -> None:
    """A stored tensor must name a block as a manifest would, or the state could not load."""
    if (
        not isinstance(ref, BlockRef)
        or ref.dtype not in DTYPE_SIZES
        or not _BLOCK_ID.match(ref.block)
    ):
        raise ValueError(f"{where} does not name a block of a supported dtype: {ref!r}")
    if ref.nbytes != math.prod(ref.shape) * DTYPE_SIZES[ref.dtype]:
        raise ValueError(f"{where} claims {ref.nbytes} bytes for shape {list(ref.shape)}")


def _pack_envelope(body: dict[str, Any], stream_id: str) -> bytes:
    try:
        packed_body = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise ValueError(f"state of stream {stream_id!r} cannot be serialized: {error}") from None
    envelope = {
        "magic": MAGIC,
        "version": FORMAT_VERSION,
        "checksum": block_id(packed_body),
        "body": packed_body,
    }
    return msgpack.packb(envelope, use_bin_type=True)


def _parse_body(body: Any, version: int, label: str) -> Manifest:
    if type(body) is not dict:
        raise _corrupt(label, "the manifest body is not a map")
    raw_entries = _field(body, "tensors", list, label)
    entries = tuple(_parse_entry(raw, label) for raw in raw_entries)
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise _corrupt(label, "the manifest names a tensor twice")
    meta = _field(body, "meta", dict, label)
    written_with = body.get("written_with", {})  # absent from states saved before it existed
    if type(written_with) is not dict:
        raise _corrupt(label, "manifest field 'written_with' is not a dict")
    for value, where in ((meta, "its meta"), (written_with, "its written_with")):
        problem = _not_plain(value, where)
        if problem is not None:
            raise _corrupt(label, problem)
    return Manifest(
        version=version,
        stream_id=_field(body, "stream_id", str, label),
        fingerprint=_field(body, "fingerprint", str, label),
        meta=meta,
        tensors=entries,
        written_with=written_with,
    )


def _parse_entry(raw: Any, label: str) -> TensorEntry:
    if type(raw) is not dict:
        raise _corrupt(label, "a tensor entry of the manifest is not a map")
    name = _field(raw, "name", str, label)
    dtype = _field(raw, "dtype", str, label)
    if dtype not in DTYPE_SIZES:
        raise _corrupt(label, f"tensor {name!r} has unknown dtype {dtype!r}")
    shape = tuple(_field(raw, "shape", list, label))
    if any(type(size) is not int or size < 0 for size in shape):
        raise _corrupt(label, f"tensor {name!r} has invalid shape {list(shape)}")
    if math.prod(max(size, 1) for size in shape) * DTYPE_SIZES[dtype] > _MAX_EXTENT:
        raise _corrupt(label, f"tensor {name!r} has impossibly large shape {list(shape)}")
    block = _field(raw, "block", str, label)
    if not _BLOCK_ID.match(block):
        raise _corrupt(label, f"tensor {name!r} names invalid block id {block!r}")
    nbytes = _field(raw, "nbytes", int, label)
    if nbytes != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _corrupt(label, f"tensor {name!r} claims {nbytes} bytes for shape {list(shape)}")
    return TensorEntry(name=name, dtype=dtype, shape=shape, block=block, nbytes=nbytes)


def _first_difference(path: str, saved: Any, running: Any) -> tuple[str, Any, Any]:
    """Where two unequal plain values first differ: 'rope.rope_theta', 'layer_types[5]'."""
    if type(saved) is dict and type(running) is dict:
        for key in sorted(saved.keys() | running.keys()):
            inner = saved.get(key, _ABSENT), running.get(key, _ABSENT)
            if inner[0] != inner[1]:
                return _first_difference(f"{path}.{key}", *inner)
    if type(saved) is list and type(running) is list and len(saved) == len(running):
        for index, inner in enumerate(zip(saved, running, strict=True)):
            if inner[0] != inner[1]:
                return _first_difference(f"{path}[{index}]", *inner)
    return path, saved, running


def _shown(path: str, value: Any) -> str:
    return f"no {path}" if value is _ABSENT else f"{path}={value!r}"


def _unpack(data: bytes, label: str, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise _corrupt(label, f"the {what} is unreadable ({error})") from None


def _field(mapping: dict[Any, Any], key: str, kind: type, label: str) -> Any:
    """A manifest field of exactly `kind` (msgpack yields exact types; rejects bool as int)."""
    value = mapping.get(key)
    if type(value) is not kind:
        raise _corrupt(label, f"manifest field {key!r} is missing or not a {kind.__name__}")
    return value


def _corrupt(label: str, problem: str) -> StateCorruptError:
    return StateCorruptError(f"{label} is corrupt: {problem}; {_CORRUPT_FIX}")


def _require_str(value: Any, where: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a str, got {type(value).__name__}")


def _check_plain(value: Any, where: str) -> None:
    """Reject what msgpack would not give back unchanged: tuples, non-str keys, objects."""
    problem = _not_plain(value, where)
    if problem is not None:
        raise TypeError(problem)


def _not_plain(value: Any, where: str) -> str | None:
    """What makes `value` more than plain data nested at most MAX_META_DEPTH deep, or None.

    Iterative, so that no nesting exhausts Python's stack; the encoder and the decoder share it,
    so every meta one writes the other reads, and a decoded meta saves again unchanged.
    """
    pending = [(value, where, 0)]
    while pending:
        item, path, depth = pending.pop()
        if isinstance(item, _PLAIN_SCALARS):
            continue
        if depth >= MAX_META_DEPTH:
            return f"{path} nests deeper than {MAX_META_DEPTH} levels"
        if isinstance(item, list):
            pending += ((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return f"{path} has key {key!r}; meta dict keys must be str"
                pending.append((child, f"{path}[{key!r}]", depth + 1))
        else:
            return (
                f"{path} is a {type(item).__name__}; meta holds only None, bool, int, float, "
                "str, bytes, lists and str-keyed dicts (use a list instead of a tuple)"
            )
    return None
