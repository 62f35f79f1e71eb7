"""A batched decode step's forward for the Llama family, without transformers' plumbing.

On the CPU a one-stream decode step is mostly small ops and the Python between them, and a
tenth of it went to transformers' own plumbing around a forward of one token: output
capturing and its decorators, the mask preprocessing, the keyword arguments every layer
passes on, the cache's dispatch by layer index. Where a decoder layer is Llama's (Llama,
Mistral, Qwen2: a norm, attention with rotary, a norm, a gated MLP, each added to the residual),
the step calls the model's own modules and functions in the order its forward does, so a row
gets transformers' bits (the tests check it for each of them), and skips the rest. Where our
kernel packs them, a layer's query, key and value projections run as one call, and its MLP's
gate and up projections as another (batch_invariance.FusedLinears: the same bits); where
decode_kernel.py's kernels run, the family's rotary function is one call, and each residual add
runs in one call with the norm after it (norm_kernel.add_and_norm), with the same bits. Where
every layer runs those kernels, decode_layers.py runs all the layers in one call instead of this
module's loop, again with the same bits.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel

from worker.model import decode_kernel, decode_layers
from worker.model.attention import ATTENTION, DecodeFrames, attention
from worker.model.batch_invariance import fused
from worker.model.layer_kinds import is_hybrid
from worker.model.norm_kernel import add_and_norm

if TYPE_CHECKING:
    from worker.model.batch_cache import BatchCache  # which runs this forward

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2"})


def takes(model: PreTrainedModel, batch: BatchCache) -> bool:
    """Whether this step may run `model`'s decode forward: a Llama-family model through our
    attention, every layer full (one mask)."""
    return (
        model.config.model_type in LLAMA_FAMILY
        and model.config._attn_implementation == ATTENTION
        and not is_hybrid(batch.kinds)
    )


def forward(
    model: PreTrainedModel,
    batch: BatchCache,
    frames: DecodeFrames,
    tokens: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """tokens [rows] through every layer, each row's new key and value into `batch` (whose
    `frames` the caller has set): the last logits [rows, vocab]. The layers run in one call
    where decode_layers.py takes the step."""
    body = model.base_model
    hidden = body.embed_tokens(tokens[:, None])
    rotary = body.rotary_emb(hidden, positions)
    normed = body.layers[0].input_layernorm(hidden)
    stack = decode_layers.stack_for(model, batch, hidden)
    if stack is not None:
        normed = decode_layers.run(stack, batch, frames, hidden, normed, rotary)
    else:
        normed = _layers(body, batch, hidden, normed, *rotary)
    return model.lm_head(normed)[:, -1]


def _layers(
    body: nn.Module,
    batch: BatchCache,
    hidden: torch.Tensor,
    normed: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """Every layer, one kernel or module call at a time: the last layer's output, normed."""
    mask = batch.attention_mask()
    rotate = _rotary(body, hidden)
    layers = body.layers
    # Each residual add runs in one call with the norm after it: the next layer's, or the last.
    following = [layer.input_layernorm for layer in layers[1:]] + [body.norm]
    for index, layer in enumerate(layers):
        attn = layer.self_attn
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2) for t in _projections(attn, normed))
        query, key = rotate(query, key, cos, sin)
        key, value = batch.layers[index].update(key, value)
        out, _ = attention(attn, query, key, value, mask, scaling=attn.scaling)
        out = attn.o_proj(out.reshape(*normed.shape[:-1], -1).contiguous())
        hidden, normed = add_and_norm(layer.post_attention_layernorm, hidden, out)
        hidden, normed = add_and_norm(following[index], hidden, _mlp(layer.mlp, normed))
    return normed


def _rotary(body: nn.Module, hidden: torch.Tensor) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The family's rotary function, as its attention calls it: the kernel's one call where it
    takes the step, else the function itself."""
    attn = body.layers[0].self_attn
    if decode_kernel.takes_rotary(hidden, attn.head_dim):
        return decode_kernel.rotary
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _projections(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The query, key and value projections, in one call where they are fused."""
    qkv = fused(attn, "streamsink_qkv")
    return qkv(x) if qkv else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's gated MLP, its gate and up projections in one call where they are fused."""
    gate_up = fused(mlp, "streamsink_gate_up")
    if gate_up is None:
        return mlp(x)
    gate, up = gate_up(x)
    return mlp.down_proj(mlp.act_fn(gate) * up)
