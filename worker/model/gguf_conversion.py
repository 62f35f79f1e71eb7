"""Turn a GGUF file into a transformers model directory (safetensors), once.

Dequantizing a GGUF takes tens of seconds; loading safetensors takes well under one. The
converted directory is written beside its final name and renamed into place, so an interrupted
conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.exceptions import ModelLoadError


def converted_dir_for(gguf: Path, cache_dir: Path) -> Path:
    """A cache directory name that changes whenever the GGUF file does."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    return cache_dir / f"{gguf.stem}-{hashlib.sha256(identity).hexdigest()[:12]}"


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize `gguf` to float32 safetensors plus its tokenizer, in `target`."""
    if (target / "config.json").exists():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as error:  # transformers raises many kinds for a bad or foreign GGUF
        raise ModelLoadError(f"could not read GGUF {gguf}: {error}") from error
    # The dequantized weights are plain float32 now; the GGUF quantizer only blocks saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(partial)
    return target
