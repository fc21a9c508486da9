"""Hugging Face `config.json` <-> `ModelConfig` (Llama, Qwen2, Qwen3); `jaxpost.models.hf` reads
and writes the weights and re-exports everything here."""

from __future__ import annotations

from jaxpost.errors import UserError
from jaxpost.models.configs import ModelConfig, RopeScaling

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class CheckpointError(UserError):
    """A checkpoint directory that cannot be read as the model it claims to be."""


def config_from_hf(hf: dict, dtype: str | None = None) -> ModelConfig:
    """A `ModelConfig` from a parsed transformers `config.json`."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        archs = hf.get("architectures")
        raise CheckpointError(
            f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
            f"jaxpost supports {sorted(ARCHITECTURES)} ({sorted(ARCHITECTURES.values())})"
        )
    for flag in ("mlp_bias",):
        if hf.get(flag):
            raise CheckpointError(f"unsupported architecture option {flag}=true in config.json")
    if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
        raise CheckpointError("unsupported architecture option attention_bias=true in config.json")
    if hf.get("use_sliding_window"):
        raise CheckpointError("unsupported architecture option use_sliding_window=true")

    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type in ("default", None):
        scaling = None
    else:
        raise CheckpointError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")

    heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ModelConfig(
        family=model_type,
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        dtype=dtype or "float32",
        param_dtype=dtype or "float32",
        bos_id=hf.get("bos_token_id"),
        eos_id=eos,
        pad_id=hf.get("pad_token_id"),
    )


def config_to_hf(config: ModelConfig) -> dict:
    """The `config.json` dictionary transformers reads for this config."""
    rope: dict = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {
            "rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor,
            "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }  # fmt: skip
    hf = {
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "rope_parameters": rope,
        # Older transformers releases read these two keys instead of rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else rope,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
        "bos_token_id": config.bos_id,
        "eos_token_id": config.eos_id,
        "pad_token_id": config.pad_id,
        "use_cache": True,
    }
    if config.family == "qwen2":
        hf["use_sliding_window"] = False
    return hf
