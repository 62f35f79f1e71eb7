"""Load a model for streaming: one by name (see packaged_models.py), a Hugging Face directory,
or a GGUF file.

CUDA when available (bf16, or fp16 where bf16 is not supported), CPU otherwise (fp32), unless a
dtype is asked for (bf16 on a CPU with AVX512-BF16 or AMX decodes faster than fp32). An
architecture the sink cache cannot run is refused here, before any stream starts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from worker.exceptions import ModelLoadError
from worker.model import cpu_kernels
from worker.model.batch_invariance import make_batch_invariant
from worker.model.gguf_conversion import convert_gguf, converted_dir_for
from worker.model.layer_kinds import position_limit, require_placeable
from worker.model.model_sources import DTYPE_NAMES, check_dtype, locate_model
from worker.model.packaged_models import (
    DEFAULT_MODEL,
    PACKAGED,
    Progress,
    fetch_packaged,
    model_cache_dir,
)
from worker.model.positions import require_supported

_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to stream, and the fingerprint that a saved state must match.

    It decodes with row-independent kernels (batch_invariance.py): a stream's tokens do not
    depend on which streams share its forwards.
    """

    model: PreTrainedModel
    tokenizer: object
    name: str
    fingerprint: str

    def __post_init__(self) -> None:
        make_batch_invariant(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def max_cache(self) -> int:
        """The largest cache this model can run: its trained positions, and its sliding window."""
        return max_cache_of(self.model.config)


def max_cache_of(config: object) -> int:
    """The trained positions; the window of a model that slides every layer without saying
    so per layer (Mistral); the positions where longrope tables switch. A model whose
    `layer_types` name its sliding layers is not limited by their window: they mask by it."""
    names = ["max_position_embeddings", "n_positions", "max_seq_len"]
    if not getattr(config, "layer_types", None):
        names.append("sliding_window")
    limits = [getattr(config, name, None) for name in names] + [position_limit(config)]
    limits = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(limits) if limits else 2048


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def pick_device(requested: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device, and the dtype asked for or the device's default."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    check_dtype(dtype)
    if dtype != "auto":
        return device, DTYPES[dtype]
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def resolve_model_dir(spec: str | None, progress: Progress = lambda stage: None) -> Path:
    """The local directory holding the model named by `spec` (fetching the default if needed)."""
    found = locate_model(spec)
    if isinstance(found, str):
        return fetch_packaged(PACKAGED[found], progress)
    if found.suffix == ".gguf" and found.is_file():
        target = converted_dir_for(found, model_cache_dir())
        if not (target / "config.json").exists():
            progress(f"converting {found.name} to safetensors (once)")
        return convert_gguf(found, target)
    return found


def load_model(
    spec: str | None = None,
    device: str = "auto",
    progress: Progress = lambda stage: None,
    dtype: str = "auto",
) -> LoadedModel:
    """The model named by `spec`; its dtype is part of its fingerprint, so a state saved in
    one dtype does not restore into a worker of another."""
    directory = resolve_model_dir(spec, progress)
    _refuse_unsupported(directory)
    torch_device, dtype = pick_device(device, dtype)
    progress(f"loading {directory.name} on {torch_device} as {dtype}")
    try:
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except torch.OutOfMemoryError as error:
        raise ModelLoadError(
            f"{directory.name} does not fit on {torch_device}: {error}. Use a smaller model or "
            "--device cpu"
        ) from error
    model.eval()
    if torch_device.type == "cpu":
        cpu_kernels.status(progress)  # built here, not in the middle of a first step
    name = spec or DEFAULT_MODEL
    return LoadedModel(model, tokenizer, name, model_fingerprint(model))


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off while a model loads, a second or so: the caller's
    spinner says what is loading, and a worker's stderr carries its logs, not a bar's lines."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_random(config_file: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """A model with random weights from a config file: for speed figures, which do not depend
    on the weights, at sizes no package ships. It has no tokenizer."""
    config = AutoConfig.for_model(**json.loads(Path(config_file).read_text()))
    require_placeable(config)
    torch_device, dtype = pick_device(device, dtype)
    with torch.device(torch_device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return LoadedModel(model, None, f"random:{Path(config_file).stem}", model_fingerprint(model))


def _refuse_unsupported(directory: Path) -> None:
    """By name first (a config transformers may not even know), then by what its layers are."""
    require_supported(json.loads((directory / "config.json").read_text()).get("model_type"))
    require_placeable(AutoConfig.from_pretrained(directory))


def model_fingerprint(model: PreTrainedModel) -> str:
    """Architecture, config, dtype and a sample of every weight: what a saved state depends on.

    Weights are sampled (at most 1024 values per tensor) so that a fingerprint costs
    milliseconds even for large models; any retrained or differently quantized model differs.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(str(model.dtype).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]
