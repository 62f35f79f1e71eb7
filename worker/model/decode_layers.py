"""A batched decode step's decoder layers in one call of our kernels (kernels/decode_layers.cpp).

decode_forward.py's loop calls the kernels of a layer from Python: some twenty calls a layer,
each a few microseconds of Python and dispatch around a few microseconds of work, a third of
a one-stream step on the CPU. Where every layer runs our kernels (its query, key and value
projections fused, and its gate and up; its norms ours, all of one formula; SiLU in its MLP)
and the step's caches are read by decode_kernel.py's, the whole stack of layers is one call,
which chains the same kernels and torch ops over the same views: the same bits (the tests run
both paths against transformers' forward).

What the call takes of the model (every layer's panels, biases and norm weights) is gathered
once per model and dtype.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from worker.model import cpu_kernels, decode_kernel
from worker.model.attention import DecodeFrames
from worker.model.batch_invariance import PackedLinear, fused
from worker.model.norm_kernel import FusedRMSNorm

if TYPE_CHECKING:
    from worker.model.batch_cache import BatchCache


@dataclass(frozen=True)
class LayerStack:
    """What the call takes of a model, in its order: per layer, its fused query-key-value,
    output, fused gate-up and down panels, its post-attention norm's weight and the next norm's
    (the next layer's input norm, else the final norm), and its four projections' biases."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    shape: list[int]  # heads, kv heads, head dims, intermediate size
    scale: float  # of the attention's scores
    norm: tuple[float, float, bool]  # every norm's epsilon, offset and rounding


# model -> its dtype and first fused projections when gathered (a model packed anew has new
# ones: make_batch_invariant), and its stack
_stacks: weakref.WeakKeyDictionary[nn.Module, tuple[object, LayerStack | None]] = (
    weakref.WeakKeyDictionary()
)


def stack_for(model: PreTrainedModel, batch: BatchCache, hidden: torch.Tensor) -> LayerStack | None:
    """The model's stack where the one call takes this step (of a Llama-family model,
    decode_forward.takes): every cache's buffers made, one kind of layer, caches and hidden
    states the kernels read; else None."""
    stack = stack_of(model)
    if stack is None or hidden.dtype != model.dtype or batch.fresh or len(set(batch.kinds)) > 1:
        return None
    first = batch.runs[0]
    keys, values, _ = first.pool.chunk(0, first.first_slot)
    dims = stack.shape[2]
    ready = decode_kernel.takes(keys, values) and decode_kernel.takes_rotary(hidden, dims)
    return stack if ready else None


def stack_of(model: PreTrainedModel) -> LayerStack | None:
    """The model's stack, gathered again once it has changed dtype or been packed anew; None
    where a layer does not run our kernels."""
    packing = (model.dtype, getattr(model.base_model.layers[0].self_attn, "streamsink_qkv", None))
    known = _stacks.get(model)
    if known is None or known[0] != packing:
        known = _stacks[model] = (packing, _gather(model))
    return known[1]


def _gather(model: PreTrainedModel) -> LayerStack | None:
    body = model.base_model
    layers = body.layers
    if (
        model.device.type != "cpu"
        or getattr(model.config, "hidden_act", None) != "silu"
        or not cpu_kernels.status().ready
    ):
        return None
    norms = [body.norm]
    norms += [norm for x in layers for norm in (x.input_layernorm, x.post_attention_layernorm)]
    if not all(isinstance(norm, FusedRMSNorm) for norm in norms):
        return None
    formulas = {norm.kernel_arguments()[1:] for norm in norms}
    if len(formulas) > 1:
        return None
    first_attention = layers[0].self_attn
    dims, scale = first_attention.head_dim, first_attention.scaling
    heads = first_attention.q_proj.out_features // dims
    kv_heads = first_attention.k_proj.out_features // dims
    intermediate = layers[0].mlp.gate_proj.out_features
    following = [layer.input_layernorm for layer in layers[1:]] + [body.norm]
    weights: list[torch.Tensor] = []
    biases: list[torch.Tensor | None] = []
    for layer, after in zip(layers, following, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = fused(attn, "streamsink_qkv"), fused(mlp, "streamsink_gate_up")
        if (
            qkv is None
            or gate_up is None
            or not all(map(_ours, (attn.o_proj, mlp.down_proj)))
            or qkv.sizes != [heads * dims, kv_heads * dims, kv_heads * dims]
            or gate_up.sizes != [intermediate, intermediate]
            or (attn.head_dim, attn.scaling) != (dims, scale)
        ):
            return None
        post = layer.post_attention_layernorm
        weights += [qkv.panels, attn.o_proj.packed, gate_up.panels, mlp.down_proj.packed]
        weights += [post.weight, after.weight]
        biases += [qkv.bias, attn.o_proj.bias, gate_up.bias, mlp.down_proj.bias]
    return LayerStack(weights, biases, [heads, kv_heads, dims, intermediate], scale, formulas.pop())


def _ours(layer: nn.Module) -> bool:
    """Whether a linear layer runs our kernel, packed for its weight as it is."""
    return isinstance(layer, PackedLinear) and layer.ours and layer.is_packed


def run(
    stack: LayerStack,
    batch: BatchCache,
    frames: DecodeFrames,
    hidden: torch.Tensor,
    normed: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """hidden [rows, 1, hidden size] (and `normed`, its first layer's input norm) through every
    layer, the model's `rotary` cos and sin at each row's in-cache position; every row's new key
    and value into its slot. Returns the last layer's output, normed by the final norm."""
    storing = batch.storings[batch.kinds[0]] or (None, None)
    turning = frames.turnings[0] or (None, None)
    keys, values, runs = [], [], []
    for run in batch.runs:
        runs += [run.first_row, run.count, run.pool.chunk(0, run.first_slot)[2], run.span]
    for layer in range(len(batch.kinds)):
        for run in batch.runs:
            layer_keys, layer_values, _ = run.pool.chunk(layer, run.first_slot)
            keys.append(layer_keys)
            values.append(layer_values)
    _, normed = torch.ops.streamsink.decode_layers(
        hidden,
        normed,
        *rotary,
        stack.weights,
        stack.biases,
        stack.shape,
        stack.scale,
        *stack.norm,
        *storing,
        *turning,
        frames.head_slots,
        batch.plan.attention_mask,
        keys,
        values,
        batch.plan.new_slots,
        runs,
    )
    return normed
