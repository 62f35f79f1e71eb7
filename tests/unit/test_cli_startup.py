"""The command line starts without torch: `--help`, `topics`, `produce`, `consume` and
`streams` need no model, and importing torch and transformers took about 5 s of every such
command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")


@pytest.mark.parametrize(
    "modules",
    [
        "worker.cli.app",
        # what `streamsink streams` reads states' manifests through
        "cache_store.redis.store, cache_store.redis.admin, cache_store.local, cache_store.memory",
    ],
)
def test_importing_the_command_line_loads_neither_torch_nor_transformers(modules: str) -> None:
    probe = f"import sys, {modules}; print(*[m for m in {HEAVY!r} if m in sys.modules])"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.split() == []


def _refused_without_torch(*args: str) -> str:
    """What the command says on stderr, run in a fresh interpreter that must not have loaded
    torch or transformers by the time it exits with code 2."""
    probe = (
        "import sys\n"
        "from worker.cli.app import app\n"
        "try:\n"
        f"    app({list(args)!r})\n"
        "except SystemExit as done:\n"
        f"    print(done.code, *[m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    ran = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert ran.stdout.split() == ["2"], ran.stdout + ran.stderr
    return " ".join(ran.stderr.split())


def test_a_wrong_model_or_dtype_is_refused_before_the_model_code_is_imported(tmp_path) -> None:
    log = tmp_path / "app.log"
    log.write_text("a line\n")
    source = ["--source", f"file:{log}", "--state", f"dir:{tmp_path / 'states'}"]
    said = _refused_without_torch("run", *source, "--model", str(tmp_path / "nosuch"))
    assert f"no model at '{tmp_path / 'nosuch'}'" in said
    said = _refused_without_torch("run", *source, "--dtype", "float33")
    assert "no dtype 'float33': use auto or float32, bfloat16, float16" in said
    said = _refused_without_torch("bench", "throughput", "--dtypes", "float32,bf16")
    assert "no dtype 'bf16'" in said
