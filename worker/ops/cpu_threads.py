"""How many threads torch should use: the CPU this process is given, not the host's cores.

torch starts one thread per core of the host. In a pod limited to two CPUs on a 64-core node
that is 64 threads fighting over two CPUs' worth of time, and several workers on one machine
slow each other down many times over. The CPU a process may use is the smallest of its cgroup
quota (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`) and its affinity mask.
A fractional quota rounds down, since a thread beyond the quota is throttled, never below 1.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_v2_cpus(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs granted by `cpu.max` ("quota period", or "max period" for no limit); None if unset."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return _ratio(quota, period)


def cgroup_v1_cpus(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs granted by the CFS quota (-1 for no limit), in the cpu controller's folder."""
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = (folder / "cpu.cfs_quota_us").read_text().strip()
            period = (folder / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        return None if int(quota) < 0 else _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> float | None:
    quota_us, period_us = int(quota), int(period)
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def affinity_cpus() -> int:
    """The CPUs this process may be scheduled on (all of them where affinity is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_cpus(root: Path = CGROUP_ROOT, affinity: int | None = None) -> int:
    """The smallest of the cgroup quotas and the affinity mask, rounded down, at least 1."""
    limits = [cgroup_v2_cpus(root), cgroup_v1_cpus(root), affinity or affinity_cpus()]
    return max(1, math.floor(min(limit for limit in limits if limit is not None)))


def apply_threads(count: int) -> int:
    """Size torch's intra-op pool (and its inter-op pool, where it is still allowed: torch lets
    that be set once, before any parallel work); the count applied."""
    if count < 1:
        raise ValueError(f"--threads must be at least 1, not {count}")
    import torch  # here, not at the top: the CLI reads the quota before torch is needed

    torch.set_num_threads(count)
    # Refused once set or once parallel work has started: the intra-op pool is what counts.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(count)
    return count
