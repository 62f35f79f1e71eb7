"""The Kubernetes manifests: every overlay builds and every object validates; breakage is caught."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "validate_manifests.py"

pytestmark = pytest.mark.slow


def _validate(*overlays: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, overlays)],
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_every_overlay_builds_and_validates() -> None:
    result = _validate()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["k8s/overlays/cpu", "k8s/overlays/gpu"]
    for line in lines:
        assert "3 by crd" in line and "8 by kubernetes" in line and "6 by structural" in line


@pytest.mark.parametrize(
    ("file", "good", "bad", "complaint"),
    [
        ("worker-deployment.yaml", "terminationGracePeriodSeconds:", "terminationGracePeriod:",
         "terminationGracePeriod"),
        ("worker-scaledobject.yaml", "maxReplicaCount:", "maxReplicas:", "maxReplicas"),
        ("worker-servicemonitor.yaml", "interval: 15s", "intervall: 15s", "intervall"),
        ("kafka-topics.yaml", "  partitions: 12", "  partition: 12", "spec.partitions"),
    ],
)  # fmt: skip
def test_a_broken_manifest_is_rejected(
    tmp_path: Path, file: str, good: str, bad: str, complaint: str
) -> None:
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    target = tmp_path / "k8s" / "base" / file
    text = target.read_text()
    assert good in text
    target.write_text(text.replace(good, bad, 1))
    result = _validate(tmp_path / "k8s" / "overlays" / "cpu")
    assert result.returncode == 1
    assert "INVALID" in result.stdout and complaint in result.stdout
