"""Tiny randomly initialized models of every supported architecture, built from configs."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    MptConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from worker.model.batch_invariance import make_batch_invariant
from worker.model.loading import LoadedModel, model_fingerprint

VOCAB = 260  # the byte tokenizer's 257 tokens fit
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_configs() -> dict[str, PretrainedConfig]:
    """One config per supported architecture, with the variants that change position handling."""
    return {
        "llama": LlamaConfig(**_DECODER),
        "llama-yarn": LlamaConfig(
            **_DECODER,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        ),
        "llama3-scaled": LlamaConfig(
            **_DECODER,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "mistral": MistralConfig(**_DECODER, sliding_window=None),
        "qwen2": Qwen2Config(**_DECODER),
        "qwen3": Qwen3Config(**_DECODER, head_dim=8),
        "phi3-partial": Phi3Config(
            **_DECODER,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
            pad_token_id=0,
        ),
        "gemma": GemmaConfig(**_DECODER, head_dim=8),
        # Sliding windows far shorter than the test caches, so that they mask.
        "gemma2-hybrid": Gemma2Config(
            **_DECODER,
            head_dim=8,
            query_pre_attn_scalar=16,
            sliding_window=6,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        "gemma3-hybrid": Gemma3TextConfig(
            **{**_DECODER, "num_hidden_layers": 3},
            head_dim=8,
            query_pre_attn_scalar=16,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
        ),
        "gpt_neox-partial": GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
            },
        ),
        # Learned attention sinks (one logit per head, a weight: nothing of it in the cache),
        # sliding and full layers, yarn.
        "gpt_oss-sinks": GptOssConfig(
            **_DECODER,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=6,
        ),
        "falcon-rotary": FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
            alibi=False,
        ),
        "falcon-alibi": FalconConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            multi_query=True,
        ),
        "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        "mpt": MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=512),
    }


def tiny_model(name: str, seed: int = 0, device: str = "cpu", **changes: object) -> torch.nn.Module:
    """The tiny `name` on `device`, with `changes` made to its config values."""
    torch.manual_seed(seed)
    config = tiny_configs()[name]
    if changes:
        config = type(config)(**{**config.to_dict(), **changes})
    # Gemma 2 caps its attention logits and gpt-oss adds its sink logits, in eager attention.
    eager_only = name.startswith(("mpt", "falcon-alibi", "bloom", "gemma2", "gpt_oss"))
    config._attn_implementation = "eager" if eager_only else "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval().to(device)
    make_batch_invariant(model)  # as every loaded model runs
    return model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges): any UTF-8 text, 256 byte tokens plus an end token."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_to_unicode))}
    vocab["<end>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<end>")


def tiny_loaded(name: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny model with a byte tokenizer, ready for the commentator."""
    model = tiny_model(name, seed)
    return LoadedModel(model, byte_tokenizer(), f"tiny-{name}", model_fingerprint(model))


def save_tiny_model(directory: Path) -> Path:
    """A tiny llama with the byte tokenizer, saved like a user's model directory."""
    tiny_model("llama").save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def run_arguments(log: Path, state: Path, model_dir: Path, every_records: int) -> list[str]:
    """`streamsink run` arguments for a tiny model: a small window, short commentary."""
    return [
        "run", "--source", f"file:{log}", "--state", f"dir:{state}", "--model", str(model_dir),
        "--window", "124", "--every-records", str(every_records), "--max-new-tokens", "4",
        "--instruction", "Watch this log.", "--json",
    ]  # fmt: skip


def tiny_variant(name: str, dtype: torch.dtype = torch.float32, **changes: object) -> LoadedModel:
    """The tiny `name` with some config values changed, or in another dtype: a model that a
    state saved by the tiny `name` must refuse to restore into."""
    model = tiny_model(name, **changes).to(dtype)
    return LoadedModel(model, byte_tokenizer(), f"tiny-{name}-variant", model_fingerprint(model))
