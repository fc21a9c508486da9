"""Model configurations and named presets for the Llama-3, Qwen2/2.5 and Qwen3 families.

A `ModelConfig` is a frozen, hashable dataclass, so it can be a static argument of `jax.jit`.
The three families differ only in a few switches:

| family | q/k/v bias | q/k RMSNorm | rope scaling       | usual embeddings |
|--------|------------|-------------|--------------------|------------------|
| llama  | no         | no          | optional "llama3"  | untied (1B/3B tied) |
| qwen2  | yes        | no          | none               | tied below 3B    |
| qwen3  | no         | yes         | none               | tied below 4B    |
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

from jaxpost.errors import UserError

Family = Literal["llama", "qwen2", "qwen3"]
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Rematerialisation policies (what a block keeps for its backward; see `ModelConfig.remat`).
REMAT = ("none", "full", "dots", "attn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent rope scaling (`rope_type="llama3"` in transformers).

    Wavelengths longer than `original_max_position / low_freq_factor` are divided by `factor`,
    shorter than `original_max_position / high_freq_factor` are kept, and the band between is
    interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      family: "llama", "qwen2" or "qwen3" (decides the Hugging Face class on export).
      vocab_size: V, rows of the embedding table.
      d_model: D, the residual width (`hidden_size`).
      n_layers: number of decoder blocks.
      n_heads: H, query heads.
      n_kv_heads: K, key/value heads (grouped-query attention when K < H; H % K == 0).
      head_dim: per-head width; explicit because Qwen3 uses head_dim != D / H.
      mlp_dim: F, the SwiGLU hidden width (`intermediate_size`).
      max_seq_len: the longest position the model accepts (`max_position_embeddings`).
      rope_theta: rotary base.
      rope_scaling: Llama-3 rope scaling or None.
      norm_eps: RMSNorm epsilon.
      tie_embeddings: the LM head reuses the embedding table.
      qkv_bias: biases on the q/k/v projections (Qwen2).
      qk_norm: RMSNorm over head_dim on queries and keys before rope (Qwen3).
      dtype: compute dtype name of activations ("float32" or "bfloat16").
      param_dtype: storage dtype name of parameters.
      remat: what each block keeps of its forward for the backward pass (the rest is recomputed
        there, one block at a time): "none" (keep everything), "full" (keep only the block's
        input), "dots" (also the outputs of the projections, the matmuls without batch dims,
        that the backward reads: q, k, v, o, gate, up; not the attention scores) or "attn"
        (also attention's output, before the o projection). With `scan_layers` this is what the compiled step holds
        (benchmarks/memory.md); an unrolled loop lets XLA:CPU undo it.
      scan_layers: training and teacher-forced passes apply the stacked blocks with
        `jax.lax.scan` (True) or a Python loop over their slices (False); the parameters are the
        same stacked tree either way, and prefill/decode always loop. Scan is the default, right
        for large models: compile time stays flat in depth (Qwen2.5-0.5B's step compiles in
        ~10 s at 4 and at 24 layers) and remat holds (benchmarks/memory.md). The loop measured
        6-11% faster per SFT step for the tiny/small/medium presets (tiny 94 vs 99 ms, small
        376 vs 404 ms, medium 982 vs 1095 ms at batch 16 x 128; forward passes no faster), on
        the 2-core CPU, XLA:CPU, 2026-12-02.
      bos_id, eos_id, pad_id: special token ids written to / read from the HF config.
    """

    family: str = "qwen2"
    vocab_size: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    max_seq_len: int = 256
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self):
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(f"ModelConfig: {msg}")

        need(self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.mlp_dim >= 1 and self.max_seq_len >= 1, "mlp_dim and max_seq_len must be >= 1")
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})",
        )
        need(
            self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings: {self.head_dim}"
        )
        need(self.dtype in DTYPES, f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        need(
            self.param_dtype in DTYPES,
            f"param_dtype must be one of {tuple(DTYPES)}, got {self.param_dtype!r}",
        )
        need(self.remat in REMAT, f"unknown remat policy {self.remat!r}; use one of {REMAT}")
        need(self.rope_theta > 0 and self.norm_eps > 0, "rope_theta and norm_eps must be > 0")

    @property
    def group_size(self) -> int:
        """G, query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count, embeddings included (the head once if tied)."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * self.d_model * self.mlp_dim
        block = attn + mlp + 2 * self.d_model
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layers * block + emb + self.d_model


# Named presets. The tiny ones train in minutes on a laptop CPU; the larger ones mirror the public
# checkpoints' shapes so memory plans and benchmarks use real sizes (weights come from `load_hf`).
PRESETS: dict[str, ModelConfig] = {
    # ~0.1M parameters: unit tests and the built-in tasks' smoke runs.
    "tiny": ModelConfig(
        family="qwen2", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=16, mlp_dim=128, max_seq_len=256, qkv_bias=True,
    ),
    # ~0.8M parameters: the default student of the built-in experiments (trains on CPU in minutes).
    "small": ModelConfig(
        family="qwen2", vocab_size=64, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2,
        head_dim=32, mlp_dim=384, max_seq_len=256, qkv_bias=True,
    ),
    # ~3M parameters: the default teacher of the built-in experiments.
    "medium": ModelConfig(
        family="qwen2", vocab_size=64, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
        head_dim=32, mlp_dim=768, max_seq_len=256, qkv_bias=True,
    ),
    # ~100M parameters with a real vocabulary: forward/sampler benchmarks.
    "100m": ModelConfig(
        family="llama", vocab_size=32_000, d_model=768, n_layers=10, n_heads=12, n_kv_heads=4,
        head_dim=64, mlp_dim=2048, max_seq_len=2048, rope_theta=500_000.0, tie_embeddings=False,
    ),
    "qwen2.5-0.5b": ModelConfig(
        family="qwen2", vocab_size=151_936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
        head_dim=64, mlp_dim=4864, max_seq_len=32_768, rope_theta=1_000_000.0, qkv_bias=True,
        tie_embeddings=True, param_dtype="bfloat16", dtype="bfloat16",
    ),
    "qwen2.5-7b": ModelConfig(
        family="qwen2", vocab_size=152_064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        head_dim=128, mlp_dim=18_944, max_seq_len=32_768, rope_theta=1_000_000.0, qkv_bias=True,
        tie_embeddings=False, param_dtype="bfloat16", dtype="bfloat16",
    ),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab_size=151_936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
        head_dim=128, mlp_dim=3072, max_seq_len=40_960, rope_theta=1_000_000.0, qk_norm=True,
        tie_embeddings=True, param_dtype="bfloat16", dtype="bfloat16",
    ),
    "llama3.2-1b": ModelConfig(
        family="llama", vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        head_dim=64, mlp_dim=8192, max_seq_len=131_072, rope_theta=500_000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), norm_eps=1e-5, tie_embeddings=True,
        param_dtype="bfloat16", dtype="bfloat16",
    ),
    "llama3.1-8b": ModelConfig(
        family="llama", vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, mlp_dim=14_336, max_seq_len=131_072, rope_theta=500_000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), norm_eps=1e-5, tie_embeddings=False,
        param_dtype="bfloat16", dtype="bfloat16",
    ),
}  # fmt: skip


def get_config(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields replaced (e.g. `vocab_size` of a tokenizer)."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
