"""The command line starts without torch: `--help`, `topics`, `produce` and `consume` need no
model, and importing torch and transformers took about 5 s of every such command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers")


def test_importing_the_command_line_loads_neither_torch_nor_transformers() -> None:
    probe = f"import sys, worker.cli.app; print(*[m for m in {HEAVY!r} if m in sys.modules])"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.split() == []
