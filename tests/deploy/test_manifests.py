"""The Kubernetes manifests: every overlay builds and every object validates; breakage is caught.

The first run on a machine fetches kustomize, the CRDs and Strimzi's generator (about a minute);
later runs take about a second each (deploy/validate_manifests.py caches them).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "validate_manifests.py"

pytestmark = pytest.mark.slow


def _validate(*overlays: Path) -> subprocess.CompletedProcess[str]:
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
        # Each custom resource was checked against its own project's CRD, none by a fallback.
        for source in ("Kubernetes", "KEDA", "prometheus-operator", "Strimzi"):
            assert f"by {source} " in line, line
        assert ": OK, " in line and "consistency checked" in line


BROKEN = {
    # id: (file under k8s/base, text in it, replaced by, words of the complaint)
    "unknown field (Kubernetes)": (
        "worker-deployment.yaml", "terminationGracePeriodSeconds:", "terminationGracePeriod:",
        "'terminationGracePeriod' was unexpected",
    ),
    "unknown core kind": (
        "worker-pdb.yaml", "kind: PodDisruptionBudget", "kind: PodDisruptionBudgets",
        "unknown kind policy/v1 PodDisruptionBudgets",
    ),
    "unknown custom kind": (
        "worker-pdb.yaml", "apiVersion: policy/v1", "apiVersion: policy.example.com/v1",
        "unknown kind policy.example.com/v1 PodDisruptionBudget",
    ),
    "unknown field (KEDA)": (
        "worker-scaledobject.yaml", "stabilizationWindowSeconds:", "stabilizationWindow:",
        "'stabilizationWindow' was unexpected",
    ),
    "unknown field (prometheus-operator)": (
        "worker-servicemonitor.yaml", "interval: 15s", "intervall: 15s",
        "'intervall' was unexpected",
    ),
    "unknown field (Strimzi)": (
        "kafka-topics.yaml", "  partitions: 12", "  partition: 12",
        "'partition' was unexpected",
    ),
    "bad value (Strimzi)": (
        "kafka.yaml", "type: scram-sha-512", "type: scram-sha-256",
        "spec.kafka.listeners.0.authentication.type: 'scram-sha-256' is not one of",
    ),
    "version Strimzi no longer serves": (
        "kafka.yaml", "strimzi.io/v1\nkind: Kafka\n", "strimzi.io/v1beta2\nkind: Kafka\n",
        "unknown kind kafka.strimzi.io/v1beta2 Kafka",
    ),
    "custom resource metadata": (
        "kafka-user.yaml", "  labels:", "  label:",
        "KafkaUser streamsink: metadata: Additional properties are not allowed ('label'",
    ),
    "more workers than partitions": (
        "worker-scaledobject.yaml", "maxReplicaCount: 12", "maxReplicaCount: 16",
        "maxReplicaCount should equal the partitions of its topic streamsink-input (12)",
    ),
    "grace shorter than the shutdown": (
        "worker-deployment.yaml", "terminationGracePeriodSeconds: 90",
        "terminationGracePeriodSeconds: 60",
        "terminationGracePeriodSeconds 60 must exceed STREAMSINK_SHUTDOWN_SECONDS 60",
    ),
    "missing Secret": (
        "worker-scaledobject.yaml", "name: streamsink-kafka-credentials\n      key: sasl",
        "name: streamsink-kafka-creds\n      key: sasl",
        "TriggerAuthentication streamsink-kafka: names Secret streamsink-kafka-creds",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("file", "good", "bad", "complaint"), BROKEN.values(), ids=BROKEN)
def test_a_broken_manifest_is_rejected(
    tmp_path: Path, file: str, good: str, bad: str, complaint: str
) -> None:
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    target = tmp_path / "k8s" / "base" / file
    text = target.read_text()
    assert good in text
    target.write_text(text.replace(good, bad, 1))
    result = _validate(tmp_path / "k8s" / "overlays" / "cpu")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "INVALID: " in result.stdout and complaint in result.stdout, result.stdout
