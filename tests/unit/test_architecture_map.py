"""ARCHITECTURE.md matches the tree: it names every module, and every module it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAP = (ROOT / "ARCHITECTURE.md").read_text()


def _modules() -> list[Path]:
    found = [*(ROOT / "worker").rglob("*.py"), *(ROOT / "cache_store").rglob("*.py")]
    return sorted(path for path in found if path.name not in ("__init__.py", "__main__.py"))


def test_every_module_is_on_the_map() -> None:
    named = set(re.findall(r"[\w/]*?(\w+\.py)", MAP))
    missing = [str(path.relative_to(ROOT)) for path in _modules() if path.name not in named]
    assert missing == []


def test_every_module_on_the_map_exists() -> None:
    existing = {path.name for path in ROOT.rglob("*.py") if ".git" not in path.parts}
    named = set(re.findall(r"\b(\w+\.py)\b", MAP))
    assert sorted(named - existing) == []
