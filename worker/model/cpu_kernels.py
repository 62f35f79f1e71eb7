"""CPU kernels of our own (kernels/*.cpp), built once per machine and torch release, loaded
once per process: the linear layers (linear_kernel.py), a decode step's attention
(decode_kernel.py) and the norms (norm_kernel.py).

Each computes a row's result from the row alone, as batch_invariance.py requires, and faster
than the stock kernels where it counts: oneDNN reads the weights of a few rows at half the
memory's speed, MKL's batched GEMM reads the caches of a decode step at a third of it, and a
norm is seven ops that each cost more to dispatch than to compute. Their
bits are ours, not oneDNN's or MKL's: every worker of a fleet must take the same path (a fleet
runs one image on one kind of CPU, as oneDNN's kernels already ask).

They are built with torch's C++ extension tools (a C++ compiler and ninja), into
$STREAMSINK_KERNEL_CACHE (else ~/.cache/streamsink/kernels); `python -m
worker.model.cpu_kernels` builds them ahead (deploy/setup.sh and the image do). Where they
cannot be had (neither AVX-512 nor AVX2 with FMA, no compiler, or STREAMSINK_CPU_KERNELS=0),
the model runs through oneDNN and torch's matmuls, as before. The AVX2 kernels sum in the
order of the AVX-512 ones: their results have the same bits on either CPU.
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

KERNELS = Path(__file__).with_name("kernels")
SOURCES = tuple(sorted(KERNELS.glob("*.cpp")))  # compiled; they include the headers
HEADERS = tuple(sorted(KERNELS.glob("*.h")))
LIBRARY = "streamsink_kernels"
SWITCH = "STREAMSINK_CPU_KERNELS"  # "0" turns them off
# OpenMP: at::parallel_for runs on torch's threads. No contraction of a product and a sum into
# one fused multiply-add but where a kernel writes one: the order of every rounding is ours.
_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernels are loaded, and where from or why not."""

    ready: bool
    detail: str  # the library's path, or why not (a failed build's whole output)
    instruction_set: str = ""  # what they run on this CPU: "AVX-512" or "AVX2"

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


def _load(progress: Callable[[str], None]) -> KernelStatus:
    """Load the library, built here first if need be: on any x86-64 CPU, so that an image built
    on one without AVX2 still carries it to the nodes that have it."""
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
            progress("building the CPU kernels (once per machine)")
            _build(directory)
    except (OSError, RuntimeError) as error:  # no compiler or ninja, or a failed build
        return KernelStatus(False, f"not built: {str(error).strip()}")
    instruction_set = torch.ops.streamsink.instruction_set()
    if not instruction_set:
        return KernelStatus(False, "this CPU has neither AVX-512 nor AVX2 with FMA")
    return KernelStatus(True, str(library), instruction_set)


def _build_directory() -> Path:
    """One directory per sources, flags and torch release: a change of any builds anew."""
    configured = os.environ.get("STREAMSINK_KERNEL_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "streamsink" / "kernels"
    digest = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(" ".join((*_FLAGS, torch.__version__)).encode())
    return root / digest.hexdigest()[:16]


def _build(directory: Path) -> None:
    from torch.utils.cpp_extension import load  # imports setuptools: only when building

    directory.mkdir(parents=True, exist_ok=True)
    load(
        LIBRARY,
        [str(source) for source in SOURCES],
        extra_cflags=list(_FLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        is_python_module=False,
    )


def main() -> None:
    """Build the kernels unless built, for setup scripts and images; say so on stderr when it
    builds them or cannot (the model then runs through oneDNN and torch's matmuls)."""
    started = time.monotonic()
    library = _build_directory() / f"{LIBRARY}.so"
    fresh = not library.exists()
    result = status(lambda stage: print(stage, file=sys.stderr, flush=True))
    if fresh and library.exists():
        took = time.monotonic() - started
        print(f"CPU kernels built in {took:.0f} s: {library}", file=sys.stderr)
    if not result.ready:
        print(f"CPU kernels unavailable: {result.detail}", file=sys.stderr)


if __name__ == "__main__":
    main()
