"""Kernels whose result for one stream does not depend on the others in its forward.

A decode step over many streams is one forward of one token per stream. With the stock CPU
kernels, what a stream gets depends on how many rows that forward has: MKL's fp32 GEMM takes
another path (and sums in another order) for 1 row, for 2-3 and for 4 or more, and the CPU
flash attention splits its work otherwise for one row than for several. The logits agree to
1e-5, but a greedy token at a near tie would flip, and a stream's commentary would then depend
on which streams happened to share its forwards.

So every forward runs kernels that compute each row on its own:
- each linear layer is ours (linear_kernel.py) where the CPU kernels are built (float32 and
  bfloat16): every output sums its products in one order, whatever the rows. Otherwise it
  is oneDNN's matmul over its weight packed once, in one blocked layout, whose result for a
  row depends on that layout alone, not on the row count, the other rows or the thread count,
  measured for every row count from 2 to 1024 (a lone row takes a matrix-vector path of its
  own, so it is given a second row). Both are 2-4x faster than MKL's on a CPU MKL does not
  tune for (AMD).
- attention is ours (attention.py): two matmuls and a softmax per row and kv head, whose
  result for a row does not depend on the batch or the thread count either (SDPA's CPU kernel
  splits its work by the thread count, and a prefill's bits would follow the worker's CPUs).

The kernels are installed on the model itself (see `LoadedModel`), so the sequential path, the
batched path and `--max-batch 1` give every stream the same bits. Where they cannot be (no
oneDNN, another device, a dtype it does not take, layers of other weights such as mixture of
experts, attention that is not SDPA: eager softcapping, an attention call of the model's own),
`is_batch_invariant` says so and each stream runs its forwards alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from worker.model import linear_kernel, norm_kernel
from worker.model.attention import ATTENTION

PACKED_DTYPES = (torch.float32, torch.bfloat16)
_PACKING_ROWS = 16  # oneDNN's layout hint; the bits do not depend on it, the speed barely


class PackedLinear(nn.Linear):
    """A linear layer through our kernel or oneDNN, with its weight packed once for it
    (`pack`); see the module docstring. The packed copy is no parameter: state dicts and
    fingerprints do not see it."""

    packed: torch.Tensor | None = None
    ours: bool = False  # packed for linear_kernel.py, else for oneDNN

    @property
    def is_packed(self) -> bool:
        """Whether the packed copy is of the weight as it is (a model moved to another dtype
        since is not)."""
        return self.packed is not None and self.packed.dtype == self.weight.dtype

    def pack(self) -> None:
        weight = self.weight.detach()
        self.ours = linear_kernel.takes(weight)
        if self.ours:
            self.packed = linear_kernel.pack(weight)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACKING_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_packed or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        if self.ours:
            return linear_kernel.linear(x, self.packed, self.out_features, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        lone = rows.shape[0] == 1
        if lone:  # one row takes a path of its own: make it one of two
            rows = rows.expand(2, -1)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return (out[:1] if lone else out).view(*x.shape[:-1], out.shape[-1])


class FusedLinears:
    """Linear layers of one input as one call of our kernel: their packed weights side by
    side, each layer's own packed weight a view of its part (no memory twice over). Each output
    sums its products in one order whatever its panel, so each layer's outputs have the bits
    of its own call."""

    def __init__(self, layers: Sequence[PackedLinear]) -> None:
        self.layers = tuple(layers)
        self.sizes = [layer.out_features for layer in layers]
        self.panels = torch.cat([layer.packed for layer in layers])
        first = 0
        for layer in layers:
            count = len(layer.packed)
            layer.packed = self.panels[first : first + count]
            first += count
        has_bias = layers[0].bias is not None
        self.bias = torch.cat([layer.bias.detach() for layer in layers]) if has_bias else None

    @staticmethod
    def possible(layers: Sequence[nn.Module]) -> bool:
        """Layers packed for our kernel, of one input and dtype, whole panels each (no padding
        between their outputs), all with a bias or none."""
        first = layers[0]
        return all(
            isinstance(layer, PackedLinear)
            and layer.ours
            and layer.is_packed
            and layer.out_features % linear_kernel.PANEL == 0
            and layer.in_features == first.in_features
            and layer.weight.dtype == first.weight.dtype
            and (layer.bias is None) == (first.bias is None)
            for layer in layers
        )

    @property
    def current(self) -> bool:
        """Whether the panels are of the weights as they are (a model moved to another dtype
        since is not), as PackedLinear.is_packed."""
        return self.panels.dtype == self.layers[0].weight.dtype

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each layer's outputs, as views of one call's."""
        out = linear_kernel.linear(x, self.panels, sum(self.sizes), self.bias)
        return out.split(self.sizes, dim=-1)


FUSED = {  # the attribute a fused group is kept under, and the layers it fuses
    "streamsink_qkv": ("q_proj", "k_proj", "v_proj"),
    "streamsink_gate_up": ("gate_proj", "up_proj"),
}


def fuse_projections(model: PreTrainedModel) -> None:
    """Fuse each attention's query, key and value projections and each MLP's gate and up
    projections where our kernel packs them all (see FusedLinears; decode_forward.py calls
    them)."""
    for module in model.modules():
        for attribute, names in FUSED.items():
            layers = [getattr(module, name, None) for name in names]
            if all(layers) and FusedLinears.possible(layers):
                setattr(module, attribute, FusedLinears(layers))


def fused(module: nn.Module, attribute: str) -> FusedLinears | None:
    """The module's fused group kept under `attribute`, while it is current."""
    group = getattr(module, attribute, None)
    return group if group is not None and group.current else None


def make_batch_invariant(model: PreTrainedModel) -> None:
    """Give `model` the row-independent kernels where it can take them (idempotent).

    Attention is replaced only where the model runs SDPA through transformers' attention
    interface: eager attention (Gemma 2's softcapping, gpt-oss's sink logits) stays. The norms
    go through norm_kernel.py, which computes each row on its own as well.
    """
    for module in model.modules():
        norm_kernel.fuse(module)
    if model.device.type == "cuda":
        _use_our_attention(model)  # for the fixed-shape decode step (graph_step.py)
    if not _can_pack(model):
        return
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
        if isinstance(module, PackedLinear) and not module.is_packed:
            module.pack()
    fuse_projections(model)
    _use_our_attention(model)


def _use_our_attention(model: PreTrainedModel) -> None:
    """Our attention where the model runs SDPA through transformers' interface."""
    if model.config._attn_implementation == "sdpa" and model._can_set_attn_implementation():
        model.set_attn_implementation(ATTENTION)


def is_batch_invariant(model: PreTrainedModel) -> bool:
    """Whether a row's forward through `model` is the same whatever rows share it."""
    return model.config._attn_implementation == ATTENTION and all(
        parameter.dim() < 2
        or isinstance(module, nn.Embedding)
        or (isinstance(module, PackedLinear) and module.is_packed)
        for module in model.modules()
        for parameter in module.parameters(recurse=False)
    )


@contextmanager
def stock_kernels(model: PreTrainedModel) -> Iterator[None]:
    """Within: `model` runs transformers' own kernels (a reference to measure against)."""
    packed = [m for m in model.modules() if type(m) is PackedLinear]
    norms = [m for m in model.modules() if isinstance(m, norm_kernel.FusedRMSNorm)]
    attention = model.config._attn_implementation
    for module in packed:
        module.__class__ = nn.Linear
    for module in norms:
        norm_kernel.unfuse(module)
    if attention == ATTENTION:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        for module in packed:
            module.__class__ = PackedLinear
        for module in norms:
            norm_kernel.fuse(module)
        if attention == ATTENTION:
            model.set_attn_implementation(ATTENTION)


def _can_pack(model: PreTrainedModel) -> bool:
    """oneDNN's matmul on this model's device and dtype (bfloat16 only where the CPU has
    oneDNN's bfloat16 path: AVX-512 or AVX-NE-CONVERT)."""
    return (
        model.device.type == "cpu"
        and model.dtype in PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and (model.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
