"""llama.cpp on the same weights: the tool a user would pick instead, measured in the same run
as `bench throughput`'s own paths, where llama-cpp-python is installed (the `llama` extra,
which nothing else needs).

llama.cpp runs the model's own GGUF rewritten once as F32 by llama.cpp's quantize (so it holds
the dequantized weights the worker runs), kept in the model cache. Each stream is a sequence
of one context (a KV buffer per sequence, llama.cpp's default cache type), prefilled with
the same number of random tokens as the sink caches hold, in chunks of PREFILL_CHUNK; a decode
step is one batch of a token per sequence, as its batched bench runs them. The first
sequence's prefill is the prefill figure. llama.cpp keeps no sinks and evicts nothing: its
sequences grow by a token a step, which at `steps` steps past `size` is the same work.
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from worker.exceptions import ModelLoadError
from worker.model.loading import LoadedModel
from worker.model.packaged_models import PACKAGED, model_cache_dir, packaged_gguf
from worker.tools.measure import PREFILL_CHUNK, random_ids

CELL_BLOCK = 256

try:
    import llama_cpp
except ImportError:  # the optional extra is not installed: no llama.cpp column
    llama_cpp = None
else:  # its quantize, load and graph logs stay off the bench's stderr
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def available() -> bool:
    return llama_cpp is not None


def f32_path(spec: str) -> Path | None:
    """Where the F32 GGUF of the model `spec` names goes, or None for a model that comes from
    no GGUF (a Hugging Face directory)."""
    if spec in PACKAGED:
        return model_cache_dir() / f"{PACKAGED[spec].converted_name}-f32.gguf"
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return model_cache_dir() / f"{path.stem}-f32.gguf"
    return None


def f32_gguf(spec: str, progress: Callable[[str], None] = lambda stage: None) -> Path:
    """The model `spec` names (a packaged name or a .gguf) as an F32 GGUF, made once."""
    target = f32_path(spec)
    if target is None:
        raise ModelLoadError(
            f"llama.cpp needs a GGUF: {spec!r} is neither a packaged model nor one"
        )
    if target.exists():
        return target
    progress(f"writing {target.name} with llama.cpp's quantize (once)")
    packaged = PACKAGED.get(spec)
    source = packaged_gguf(packaged, progress) if packaged else nullcontext(Path(spec).expanduser())
    with source as gguf:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(
            str(gguf).encode(), str(partial).encode(), ctypes.byref(params)
        ):
            raise ModelLoadError(f"llama.cpp could not rewrite {gguf.name} as F32")
        partial.rename(target)
    return target


class LlamaCpp:
    """One loaded llama.cpp model; each call of `rates` makes a context of its own."""

    def __init__(self, gguf: Path, loaded: LoadedModel, threads: int) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {gguf}")
        self.loaded, self.threads = loaded, threads

    def close(self) -> None:
        llama_cpp.llama_model_free(self.model)

    def rates(self, streams: int, size: int, steps: int) -> tuple[float, float]:
        """Prefill tokens/s of the first sequence, and decode tokens/s in all over `streams`
        sequences of `size` tokens, from the median step of `steps`."""
        context = self._context(streams, size + steps + 1)
        try:
            started = time.perf_counter()
            self._prefill(context, 0, size)
            prefill = size / (time.perf_counter() - started)
            for sequence in range(1, streams):
                self._prefill(context, sequence, size)
            ids = random_ids(self.loaded, streams * steps, seed=1).view(steps, streams)
            batch = llama_cpp.llama_batch_init(streams, 0, 1)
            try:
                seconds = [
                    self._timed_step(context, batch, ids[step], size + step)
                    for step in range(steps)
                ]
            finally:
                llama_cpp.llama_batch_free(batch)
        finally:
            llama_cpp.llama_free(context)
        return prefill, streams / statistics.median(seconds)

    def _context(self, streams: int, length: int) -> object:
        params = llama_cpp.llama_context_default_params()
        # A sequence's cells come in blocks of 256: ask for whole blocks, or llama.cpp warns.
        params.n_ctx = streams * -(-length // CELL_BLOCK) * CELL_BLOCK
        params.n_batch = params.n_ubatch = max(PREFILL_CHUNK, streams)
        params.n_seq_max = streams
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = False  # each sequence attends over its own tokens only
        context = llama_cpp.llama_init_from_model(self.model, params)
        if not context:
            raise ModelLoadError(f"llama.cpp could not make a context of {streams} sequences")
        return context

    def _prefill(self, context: object, sequence: int, size: int) -> None:
        ids = random_ids(self.loaded, size, seed=sequence)
        batch = llama_cpp.llama_batch_init(PREFILL_CHUNK, 0, 1)
        try:
            for start in range(0, size, PREFILL_CHUNK):
                piece = ids[start : start + PREFILL_CHUNK].tolist()
                last = [False] * (len(piece) - 1) + [True]  # logits of the last token only
                _fill(batch, piece, [sequence] * len(piece), range(start, start + len(piece)), last)
                _decode(context, batch)
        finally:
            llama_cpp.llama_batch_free(batch)

    def _timed_step(
        self, context: object, batch: object, ids: torch.Tensor, position: int
    ) -> float:
        count = len(ids)  # token i of sequence i, every one at `position`, with its logits
        _fill(batch, ids.tolist(), range(count), [position] * count, [True] * count)
        started = time.perf_counter()
        _decode(context, batch)
        return time.perf_counter() - started


def _fill(
    batch: object,
    tokens: Sequence[int],
    sequences: Sequence[int],
    positions: Sequence[int],
    logits: Sequence[bool],
) -> None:
    """Token i of sequence i at position i of the batch, its logits kept where asked."""
    batch.n_tokens = len(tokens)
    rows = zip(tokens, sequences, positions, logits, strict=True)
    for i, (token, sequence, position, keep) in enumerate(rows):
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = sequence
        batch.logits[i] = keep


def _decode(context: object, batch: object) -> None:
    if llama_cpp.llama_decode(context, batch) != 0:
        raise ModelLoadError("llama.cpp refused a batch (is the context large enough?)")
