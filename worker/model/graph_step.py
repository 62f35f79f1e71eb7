"""A decode step of one fixed shape, for a GPU: every slot of a pool chunk is a row, and the
forward is replayed from a CUDA graph.

On a GPU the kernels cuBLAS picks for a matmul depend on its row count, so a row's bits would
follow its company. Here every decode forward has one shape: the rows are the slots of one
chunk of the caches' KVPool (a decoder's: 32, or as many as fit kv_pool.GPU_CHUNK_BYTES), each
attending over the whole capacity. A row whose cache takes no token this step (a free slot, or
a stream not decoding now) writes back what its slot held, and its logits are dropped. A row's
result then depends on its own cache and token alone, whatever the other rows hold: a stream's
commentary does not depend on which streams shared its steps, how many did, or which slot it
took. Every row costs its reads of the whole cache, though: a step reads its whole chunk.

A fixed shape is also what a CUDA graph needs. A chunk's forward is captured once; each step
copies its inputs (tokens, positions, the mask, each row's turns and new slot) into the
graph's buffers and replays it, where a small model's step would otherwise be mostly kernel
launches. Before the capture, each decoder layer's forward is compiled (torch.compile, for
the one shape: its norms, rotary and small ops fuse into a few kernels); where that fails the
step runs uncompiled, with a warning, and STREAMSINK_COMPILE=0 turns it off. On the CPU the
same forward runs without a graph or compiling (the tests run it there, where it gives the
bits of batch_cache.py's).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from worker.model.attention import ATTENTION, DecodeFrames, Run, decoding
from worker.model.batch_step import BatchPlan, plan_batch
from worker.model.compat import LayerAcrossReleases, cache_argument
from worker.model.kv_pool import KVPool
from worker.model.layer_kinds import LayerKind, is_hybrid
from worker.model.sink_cache import SinkCache, decode_steps, require_rows

WARMUPS = 2  # forwards before a capture: cuBLAS makes its handles and workspaces, and compiles
COMPILE_SWITCH = "STREAMSINK_COMPILE"  # "0": the decode step's layers run uncompiled


def graph_steps(model: PreTrainedModel, pool: KVPool) -> GraphSteps | None:
    """The fixed-shape steps of `pool`'s caches where `model` decodes at that shape (on a GPU,
    through our attention), else None."""
    if model.device.type == "cuda" and model.config._attn_implementation == ATTENTION:
        return GraphSteps(model, pool)
    return None


class GraphSteps:
    """The fixed-shape decode steps of the caches of one pool, a ChunkStep per chunk, made
    (and on a GPU captured) when a chunk first decodes."""

    def __init__(self, model: PreTrainedModel, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.capture = model.device.type == "cuda"
        self.layers = _CompiledLayers(model) if self.capture else None
        self._chunks: dict[int, ChunkStep] = {}

    def takes(self, caches: Sequence[SinkCache]) -> bool:
        """Whether these caches can decode here: all of this pool, every layer made, rotary,
        no layer sliding (one mask)."""
        pool = self.pool
        return (
            all(cache.pool is pool and cache.order_free for cache in caches)
            and not is_hybrid(caches[0].kinds)
            and all(pool.made(layer) for layer in range(len(caches[0].kinds)))
        )

    @torch.inference_mode()
    def decode(self, caches: Sequence[SinkCache], tokens: torch.Tensor) -> torch.Tensor:
        """Token i [rows] into cache i: the logits [rows, vocab], one forward per chunk the
        caches lie in. Each cache commits its step only once its chunk's forward succeeded."""
        require_rows(caches)  # all of them, before a chunk's caches commit
        chunks: dict[int, list[int]] = {}
        for row, cache in enumerate(caches):
            chunks.setdefault(cache.slot // self.pool.chunk_slots, []).append(row)
        logits: torch.Tensor | None = None
        for chunk, rows in sorted(chunks.items()):
            step = self._chunk(chunk, caches[rows[0]])
            out = step.decode([caches[row] for row in rows], tokens[rows])
            if len(chunks) == 1:
                return out  # every row, in order
            if logits is None:
                logits = out.new_empty((len(caches), *out.shape[1:]))
            logits[rows] = out
        return logits

    def _chunk(self, chunk: int, cache: SinkCache) -> ChunkStep:
        """The step of `chunk` (where `cache` lies), made and captured when it first decodes."""
        if chunk not in self._chunks:
            self._chunks[chunk] = ChunkStep(self.model, self.pool, chunk, cache, self.layers)
        return self._chunks[chunk]


class ChunkStep:
    """The fixed-shape decode forward of one chunk of a pool: the buffers it reads its inputs
    from, the cache the model sees, and on a GPU its captured graph."""

    def __init__(
        self,
        model: PreTrainedModel,
        pool: KVPool,
        chunk: int,
        like: SinkCache,
        layers: _CompiledLayers | None,
    ) -> None:
        """`like`: a cache of the pool, whose kinds and capacity every row shares; `layers`:
        the model's compiled layers, on a GPU (else no graph is captured)."""
        rows, device, dtype = pool.chunk_slots, model.device, model.dtype
        self.model, self.pool, self.kinds = model, pool, like.kinds
        self.first_slot = chunk * rows
        self.capacity = capacity = like.layout.capacity
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=dtype, device=device)
        self.head_slots = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.new_slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.active = torch.zeros(rows, dtype=torch.bool, device=device)
        self.every_row = torch.arange(rows, device=device)
        still = torch.zeros(rows, dtype=torch.long)  # a shift per row, refilled each step
        kinds = set(self.kinds)
        self.storings = {kind: kind.scheme.storing(still, device) for kind in kinds}
        self.turnings = {kind: kind.scheme.turning(still, device, dtype) for kind in kinds}
        self.frames = DecodeFrames(
            [kind.scheme for kind in self.kinds],
            [self.turnings[kind] for kind in self.kinds],
            self.head_slots,
            (Run(pool, 0, self.first_slot, rows, capacity),),
        )
        self.cache = ChunkCache(self)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = None if layers is None else self._capture(layers)

    def decode(self, caches: Sequence[SinkCache], tokens: torch.Tensor) -> torch.Tensor:
        """Token i into cache i, each in a slot of this chunk: their logits [rows, vocab]."""
        for cache in caches:
            _initialize(cache)
        device = self.tokens.device
        rows = torch.tensor([cache.slot - self.first_slot for cache in caches], device=device)
        # Planned on the host, and copied over once for every row (not a few small device ops
        # per row: with 32 rows, those took as long as the forward).
        with decode_steps(caches, tokens, plan_device="cpu") as plans:
            plan = plan_batch(plans, self.capacity, self.model.dtype, "cpu")
            self._load(rows, tokens, plan)
            if self.graph is None:
                logits = self._forward()
            else:
                self.graph.replay()
                logits = self.logits
        return logits[rows]  # a copy: the next replay writes the same buffer

    def write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        """Each row's new key or value [rows, heads, 1, dims] into its slot of `buffer` [rows,
        heads, capacity, dims]; a row not decoding puts back what its slot held."""
        held = buffer[self.every_row, :, self.new_slots]
        taken = torch.where(self.active[:, None, None], new[:, :, 0], held)
        buffer[self.every_row, :, self.new_slots] = taken

    def _load(self, rows: torch.Tensor, tokens: torch.Tensor, plan: BatchPlan) -> None:
        """This step's inputs (on the host) into the buffers, at the decoding rows."""
        device, dtype = self.tokens.device, self.model.dtype
        self.active.zero_()
        self.active[rows] = True
        self.tokens[rows] = tokens[:, None].to(device)
        self.positions[rows] = plan.query_positions.to(device)
        self.mask[rows] = plan.attention_mask.to(device)
        self.head_slots[rows] = plan.head_slots.to(device)
        self.new_slots[rows] = plan.new_slots.to(device)
        for kind in self.storings:
            _put(self.storings[kind], rows, kind.scheme.storing(plan.shifts, device))
            _put(self.turnings[kind], rows, kind.scheme.turning(plan.shifts, device, dtype))

    def _forward(self) -> torch.Tensor:
        """The forward of every row: the last logits [rows, vocab]."""
        model = self.model
        with decoding(self.frames):
            out = model(
                input_ids=self.tokens,
                position_ids=self.positions,
                attention_mask=self.mask,
                use_cache=True,
                **cache_argument(model, self.cache),
            )
        return out.logits[:, -1]

    def _capture(self, layers: _CompiledLayers) -> torch.Tensor:
        """Capture the forward through `layers`, no row decoding (so the warm-ups and the
        capture change no cache); the logits buffer each replay writes."""
        device = self.tokens.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUPS):
                layers.run(self._forward)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return layers.run(self._forward)


class ChunkCacheLayer(LayerAcrossReleases, CacheLayerMixin):
    """One model layer over the same layer of every slot of a chunk."""

    def __init__(self, step: ChunkStep, index: int, kind: LayerKind) -> None:
        super().__init__()
        self._step = step
        self._index = index
        self.kind = kind
        self.is_sliding = False
        self.is_initialized = True  # the pool holds the buffers

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to make: the pool's buffers are made (GraphSteps.takes)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new key (turned to its stream position) and value; attention reads
        the chunk's views (the step's DecodeFrames), which this returns."""
        step, index = self._step, self._index
        keys = step.pool.keys(index, step.first_slot, step.pool.chunk_slots)
        values = step.pool.values(index, step.first_slot, step.pool.chunk_slots)
        step.write(keys, self.kind.scheme.to_stored(key_states, step.storings[self.kind]))
        step.write(values, value_states)
        return keys, values

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._step.capacity, 0

    def get_seq_length(self) -> int:
        """A fixed shape has no one length: the positions and the mask say each row's."""
        return self._step.capacity - 1

    def get_max_length(self) -> int:
        return self._step.capacity


class ChunkCache(Cache):
    """The transformers Cache of a chunk's forward."""

    def __init__(self, step: ChunkStep) -> None:
        layers = [ChunkCacheLayer(step, i, kind) for i, kind in enumerate(step.kinds)]
        super().__init__(layers=layers)


class _CompiledLayers:
    """The model's decoder layers, compiled for the fixed-shape step, worn only while it runs
    (a prefill's shapes vary, and runs the layers as they are)."""

    def __init__(self, model: PreTrainedModel) -> None:
        layers = getattr(model.base_model, "layers", None)
        self.wanted = os.environ.get(COMPILE_SWITCH) != "0" and isinstance(layers, nn.ModuleList)
        self._layers = list(layers) if self.wanted else []
        self._compiled: list[Callable[..., object]] = []
        if self.wanted:
            import torch._dynamo  # only here: a GPU's step

            # Each layer is a compiled variant of its own (its index is guarded on), and so
            # is each chunk: far more than dynamo's default of 8 variants a function.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 8 * len(layers), 64)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
            self._compiled = [torch.compile(layer.forward, dynamic=False) for layer in layers]

    def run(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`forward()` through the compiled layers; uncompiled from then on if compiling fails."""
        if not self.wanted:
            return forward()
        try:
            with self._worn():
                return forward()
        except Exception as error:  # torch.compile fails in many ways; the step need not
            self.wanted = False
            warnings.warn(
                f"the decode step's layers run uncompiled: torch.compile failed ({error})",
                stacklevel=2,
            )
            return forward()

    @contextmanager
    def _worn(self) -> Iterator[None]:
        for layer, compiled in zip(self._layers, self._compiled, strict=True):
            layer.forward = compiled
        try:
            yield
        finally:
            for layer in self._layers:
                del layer.forward


def _initialize(cache: SinkCache) -> None:
    """Mark a cache's layers written to, as a forward's first write would: they are views of
    the pool's made buffers."""
    for layer in cache.layers:
        if not layer.is_initialized:
            keys, values = layer.keys, layer.values
            layer.lazy_initialization(keys, values)


def _put(buffers: tuple[torch.Tensor, ...], rows: torch.Tensor, new: tuple[torch.Tensor, ...]):
    """A turn's tensors (cos and sin, a row each) into its buffers, at `rows`."""
    for buffer, row_values in zip(buffers, new, strict=True):
        buffer[rows] = row_values
