"""Imports run one way: cli -> runtime -> {tools, io, stream} -> model, and cache_store apart.

Read from the source with `ast`, so the test needs no import of the modules it checks and
fails with the file and the line of the import that runs the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What each wing of worker/ may import from the others; worker.exceptions is shared by all,
# and cache_store may be imported by any wing but model.
ALLOWED: dict[str, set[str]] = {
    "cli": {"runtime", "tools", "io", "stream", "model", "ops", "cache_store"},
    "runtime": {"tools", "io", "stream", "model", "ops", "cache_store"},
    "tools": {"stream", "model", "ops", "cache_store"},
    "io": {"stream", "ops"},
    "stream": {"model", "ops", "cache_store"},
    "ops": set(),
    "model": set(),
    "__main__": {"cli"},  # python -m worker
}
SHARED = {"worker.exceptions"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def _target(module: str) -> str | None:
    """The wing (or cache_store) an imported module belongs to; None for libraries."""
    parts = module.split(".")
    if parts[0] == "cache_store":
        return "cache_store"
    if parts[0] != "worker" or module in SHARED or len(parts) < 2:
        return None
    return parts[1]


def _wrong_way() -> list[str]:
    problems = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        relative = path.relative_to(ROOT)
        wing = relative.parts[1] if len(relative.parts) > 2 else path.stem
        for line, module in _imports(path):
            target = _target(module)
            if target is None or target == wing:
                continue
            if target not in ALLOWED.get(wing, set()):
                problems.append(f"{relative}:{line} imports {module}")
    for path in sorted((ROOT / "cache_store").rglob("*.py")):
        for line, module in _imports(path):
            if module.split(".")[0] == "worker":
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return problems


def test_every_module_of_worker_is_in_a_wing() -> None:
    loose = [p.name for p in (ROOT / "worker").glob("*.py")]
    assert sorted(loose) == ["__init__.py", "__main__.py", "exceptions.py"]
    packages = {p.parent.name for p in (ROOT / "worker").glob("*/__init__.py")}
    assert packages == set(ALLOWED) - {"__main__"}


def test_imports_run_one_way() -> None:
    assert _wrong_way() == []


def test_the_check_sees_an_import_that_runs_the_wrong_way(tmp_path: Path, monkeypatch) -> None:
    model = tmp_path / "worker" / "model"
    model.mkdir(parents=True)
    (model / "bad.py").write_text("from worker.runtime.local_run import Runner\n")
    (tmp_path / "cache_store").mkdir()
    (tmp_path / "cache_store" / "bad.py").write_text("import worker.stream.records\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert _wrong_way() == [
        "worker/model/bad.py:1 imports worker.runtime.local_run",
        "cache_store/bad.py:1 imports worker.stream.records",
    ]
