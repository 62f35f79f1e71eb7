"""The batched decode step's two attention matmuls as CPU kernels of our own
(kernels/decode_attention.cpp), built once per machine and torch release.

A decode step's attention reads every row's whole cache for one query per head: at 16 streams
of 1024 tokens, 720 MB a step in fp32, and it took two thirds of the step. MKL's batched GEMM
reads those keys and values at a third of the memory's speed on CPUs it does not tune for
(AMD); the kernels read them at close to its speed. A row's result depends on the row alone,
as batch_invariance.py requires, but its bits are the kernels', not MKL's: every worker of a
fleet must take the same path (a fleet runs one image on one kind of CPU, as oneDNN's
kernels already ask).

They are built with torch's C++ extension tools (a C++ compiler and ninja), into
$STREAMSINK_KERNEL_CACHE (else ~/.cache/streamsink/kernels); `python -m
worker.model.decode_kernel` builds them ahead (deploy/setup.sh and the image do). Where they
cannot be had (no AVX-512, no compiler, another device or dtype, or STREAMSINK_DECODE_KERNEL=0),
attention runs through torch's matmuls, as before.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels") / "decode_attention.cpp"
LIBRARY = "streamsink_decode_attention"
MAX_DIMS = 256  # the head dims the kernels take
DTYPES = (torch.float32, torch.bfloat16)  # the caches they read; they sum in float32
SWITCH = "STREAMSINK_DECODE_KERNEL"  # "0" turns them off
_FLAGS = ("-O3", "-fopenmp")  # OpenMP: at::parallel_for runs on torch's threads


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernels are loaded, and where from or why not."""

    ready: bool
    detail: str  # the library's path, or why not (a failed build's whole output)

    @property
    def summary(self) -> str:
        """One line to show: the path, or the last line of why not."""
        return self.detail.strip().splitlines()[-1]


_status: KernelStatus | None = None
_lock = threading.Lock()


def status(progress: Callable[[str], None] = lambda stage: None) -> KernelStatus:
    """Load the kernels (building them first if this machine has not), once per process;
    after that, what every layer of a decode step asks, without the lock."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load(progress)
    return _status


def takes(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernels can read these keys and values: of one of DTYPES, on the CPU, each
    head's slots one after another, heads of at most MAX_DIMS."""
    return (
        keys.dtype == values.dtype
        and all(
            tensor.device.type == "cpu"
            and tensor.dtype in DTYPES
            and tensor.shape[-1] <= MAX_DIMS
            and tensor.stride(-1) == 1
            and tensor.stride(-2) == tensor.shape[-1]
            for tensor in (keys, values)
        )
        and status().ready
    )


def scores(queries: torch.Tensor, keys: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """float32 scores [rows, kv heads, groups, span] of queries [rows, kv heads, 2 frames,
    groups, dims] against keys [rows, kv heads, span, dims] (of the queries' dtype): a slot
    where head [rows, span] is set takes the query of frame 0, any other frame 1's."""
    return torch.ops.streamsink.decode_scores(queries, keys, head)


def mix(probabilities: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """float32 outputs [rows, kv heads, groups, dims]: float32 probabilities [rows, kv heads,
    groups, span] times values [rows, kv heads, span, dims]."""
    return torch.ops.streamsink.decode_mix(probabilities, values)


def _load(progress: Callable[[str], None]) -> KernelStatus:
    """Load the library, built here first if need be: on any x86-64 CPU, so that an image built
    on one without AVX-512 still carries it to the nodes that have it."""
    if os.environ.get(SWITCH) == "0":
        return KernelStatus(False, f"turned off by {SWITCH}=0")
    if platform.machine() not in ("x86_64", "AMD64"):
        return KernelStatus(False, "the kernels are for x86-64 CPUs")
    directory = _build_directory()
    library = directory / f"{LIBRARY}.so"
    try:
        if library.exists():
            torch.ops.load_library(library)
        else:
            progress("building the decode attention kernels (once per machine)")
            _build(directory)
    except (OSError, RuntimeError) as error:  # no compiler or ninja, or a failed build
        return KernelStatus(False, f"not built: {str(error).strip()}")
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return KernelStatus(False, "this CPU has no AVX-512")
    return KernelStatus(True, str(library))


def _build_directory() -> Path:
    """One directory per source, flags and torch release: a change of any builds anew."""
    configured = os.environ.get("STREAMSINK_KERNEL_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "streamsink" / "kernels"
    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join((*_FLAGS, torch.__version__)).encode()
    ).hexdigest()[:16]
    return root / digest


def _build(directory: Path) -> None:
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    directory.mkdir(parents=True, exist_ok=True)
    load(
        LIBRARY,
        [str(SOURCE)],
        extra_cflags=list(_FLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
    )


def main() -> None:
    """Build the kernels unless built, for setup scripts and images; say so on stderr when it
    builds them or cannot (attention then runs through torch's matmuls)."""
    started = time.monotonic()
    library = _build_directory() / f"{LIBRARY}.so"
    fresh = not library.exists()
    result = status(lambda stage: print(stage, file=sys.stderr, flush=True))
    if fresh and library.exists():
        took = time.monotonic() - started
        print(f"decode attention kernels built in {took:.0f} s: {library}", file=sys.stderr)
    if not result.ready:
        print(f"decode attention kernels unavailable: {result.detail}", file=sys.stderr)


if __name__ == "__main__":
    main()
