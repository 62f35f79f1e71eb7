"""Threads sized to the CPU the process is given, read from fake cgroup files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.ops.cpu_threads import apply_threads, available_cpus, cgroup_v1_cpus, cgroup_v2_cpus


def _write(folder: Path, **files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)
    return folder


def test_cgroup_v2_quota_and_no_limit(tmp_path: Path) -> None:
    assert cgroup_v2_cpus(_write(tmp_path / "a", cpu_max="150000 100000\n")) == 1.5
    assert cgroup_v2_cpus(_write(tmp_path / "b", cpu_max="max 100000\n")) is None
    assert cgroup_v2_cpus(tmp_path / "missing") is None


def test_cgroup_v1_quota_in_the_cpu_controller_folder(tmp_path: Path) -> None:
    _write(tmp_path / "cpu,cpuacct", cpu_cfs_quota_us="300000", cpu_cfs_period_us="100000")
    assert cgroup_v1_cpus(tmp_path) == 3.0
    unlimited = _write(tmp_path / "v1" / "cpu", cpu_cfs_quota_us="-1", cpu_cfs_period_us="100000")
    assert cgroup_v1_cpus(unlimited.parent) is None


@pytest.mark.parametrize(
    ("quota", "affinity", "expected"),
    [
        ("200000 100000", 8, 2),
        ("max 100000", 3, 3),
        ("400000 100000", 2, 2),
        ("50000 100000", 4, 1),
    ],
)
def test_the_smallest_limit_wins_rounded_down_at_least_one(
    tmp_path: Path, quota: str, affinity: int, expected: int
) -> None:
    assert available_cpus(_write(tmp_path, cpu_max=quota), affinity=affinity) == expected


def test_no_cgroup_files_leave_the_affinity_mask(tmp_path: Path) -> None:
    assert available_cpus(tmp_path, affinity=5) == 5
    assert available_cpus(tmp_path) >= 1


def test_apply_sets_torch_threads_and_refuses_zero() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="at least 1"):
        apply_threads(0)
