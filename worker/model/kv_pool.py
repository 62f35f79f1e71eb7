"""Buffers many sink caches share: per layer, keys and values in chunks of [slots, heads,
capacity, dims], a slot per cache.

A batched decode step's attention reads the rows of adjacent slots of one chunk in place, as
one view, instead of copying every row's cache into a batch (batch_cache.py), and a cache
takes its slot and gives it back without moving any other. A slot is given back when its
cache is collected, so the pool never holds on to a dropped stream. The buffers are made at a
layer's first write, when its shape is known; the pool grows a chunk at a time, with no copy,
so it holds less than a chunk of slots more than it ever had caches (growing by doubling
would hold twice as many, and copy them all while the old buffers still stood).

A chunk is allocated empty, and a slot is zeroed when it is first handed out. A chunk holds 32
slots: on the CPU a slot no cache has taken costs no memory the system has to back, and a batch
of 16 or 32 streams reads its caches in one or two runs, each one kernel call a layer; on a GPU
a chunk is the fixed shape of a decode step (graph_step.py), so it is memory taken whole and
read whole by every step: a decoder's chunk there holds as many of the 32 slots as fit in
GPU_CHUNK_BYTES (all 32 for SmolLM2 in bfloat16 at 1024 tokens, 755 MB; 2 for a 1.7B Llama at
4096), counted when its first layer's buffers are made, the same for every worker of one model,
dtype and cache size. A cache with a pool of its own gets one slot a chunk. A stream's first
prefill clears its own slot only. A freed slot keeps what its last cache wrote; a new cache's
unfilled slots are masked, so their contents (finite values, or zeros) never reach a score.
"""

from __future__ import annotations

import heapq
import math
import weakref

import torch

CHUNK_SLOTS = 32
GPU_CHUNK_BYTES = 2 * 2**30  # a step reads it in about half a millisecond on an H200


class KVPool:
    """The key and value buffers of every layer, shared by the caches that take a slot."""

    def __init__(
        self, layers: int, chunk_slots: int = CHUNK_SLOTS, chunk_bytes: int | None = None
    ) -> None:
        """At most `chunk_slots` slots a chunk, and at most `chunk_bytes` (but one slot at
        least), counted when the first layer's buffers are made."""
        self.chunk_slots = chunk_slots
        self._chunk_bytes = chunk_bytes
        self._keys: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        self._values: list[list[torch.Tensor]] = [[] for _ in range(layers)]
        self._shapes: list[tuple[torch.Size, torch.Size, torch.dtype, torch.device] | None] = [
            None
        ] * layers
        self._chunks = 0
        self._free: list[int] = []  # given back, lowest first
        self._taken = 0  # slots ever handed out (the next new one)

    def take(self, owner: object) -> int:
        """A slot for `owner`, given back once `owner` is collected."""
        if self._free:
            slot = heapq.heappop(self._free)
        else:
            slot, self._taken = self._taken, self._taken + 1
            if slot == self._chunks * self.chunk_slots:
                self._add_chunk()
            for layer in range(len(self._shapes)):
                self._clear(layer, range(slot, slot + 1))
        weakref.finalize(owner, heapq.heappush, self._free, slot)
        return slot

    def _add_chunk(self) -> None:
        self._chunks += 1
        for layer, shapes in enumerate(self._shapes):
            if shapes is not None:
                self._allocate(layer, *shapes)

    def _allocate(
        self,
        layer: int,
        keys: torch.Size,
        values: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # Ordinary tensors even when a forward (in inference mode) makes them: a restore or a
        # new stream's copy writes into them outside one.
        with torch.inference_mode(False):
            for buffers, shape in ((self._keys, keys), (self._values, values)):
                chunk = torch.empty(self.chunk_slots, *shape, dtype=dtype, device=device)
                buffers[layer].append(chunk)

    def _clear(self, layer: int, slots: range) -> None:
        """Zero `slots` of a made layer: an empty buffer may hold anything, NaN too."""
        if self.made(layer):
            with torch.inference_mode(False):
                for slot in slots:
                    self.keys(layer, slot).zero_()
                    self.values(layer, slot).zero_()

    def made(self, layer: int) -> bool:
        return self._shapes[layer] is not None

    def make(self, layer: int, keys: torch.Size, values: torch.Size, like: torch.Tensor) -> None:
        """Buffers for `layer`, whose one slot of keys and of values is shaped [heads,
        capacity, dims], in `like`'s dtype and device."""
        if self._chunk_bytes is not None and not any(map(self.made, range(len(self._shapes)))):
            self._fit_chunks(math.prod(keys) + math.prod(values), like.element_size())
        self._shapes[layer] = (torch.Size(keys), torch.Size(values), like.dtype, like.device)
        for _ in range(self._chunks):
            self._allocate(layer, keys, values, like.dtype, like.device)
        self._clear(layer, range(self._taken))

    def _fit_chunks(self, layer_elements: int, element_size: int) -> None:
        """As many slots a chunk as fit the bytes allowed, every layer shaped like the first;
        before any buffer exists, so the slots taken only move to the chunks they count in."""
        slot_bytes = len(self._shapes) * layer_elements * element_size
        self.chunk_slots = max(1, min(self.chunk_slots, self._chunk_bytes // slot_bytes))
        self._chunks = -(-self._taken // self.chunk_slots)

    def keys(self, layer: int, slot: int, count: int = 1) -> torch.Tensor:
        """[count, heads, capacity, dims]: slots slot.. of one chunk, as a view."""
        return self._view(self._keys[layer], slot, count)

    def values(self, layer: int, slot: int, count: int = 1) -> torch.Tensor:
        return self._view(self._values[layer], slot, count)

    def chunk(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The keys and values of the chunk that holds `slot`, whole, and the slot's index in
        it: what a step that slices its runs itself takes (decode_layers.py)."""
        chunk, first = divmod(slot, self.chunk_slots)
        return self._keys[layer][chunk], self._values[layer][chunk], first

    def same_chunk(self, slot: int, other: int) -> bool:
        """Whether two slots lie in one chunk (a run of rows is read as one view of it)."""
        return slot // self.chunk_slots == other // self.chunk_slots

    def _view(self, chunks: list[torch.Tensor], slot: int, count: int) -> torch.Tensor:
        chunk, first = divmod(slot, self.chunk_slots)
        if first + count > self.chunk_slots:
            raise ValueError(f"slots {slot}..{slot + count - 1} lie in more than one chunk")
        return chunks[chunk][first : first + count]


def decoder_pool(layers: int, device: torch.device) -> KVPool:
    """The pool of a decoder's caches on `device`: on a GPU, chunks of at most
    GPU_CHUNK_BYTES."""
    return KVPool(layers, chunk_bytes=GPU_CHUNK_BYTES if device.type == "cuda" else None)
