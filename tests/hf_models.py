"""Tiny random Hugging Face models built locally with transformers (PyTorch CPU), for parity tests.

Nothing is downloaded: configs are written here and weights are random. Every parameter, norms and
biases included, is perturbed so a mapping mistake cannot hide behind a default initialisation.
"""

from __future__ import annotations

import os

import numpy as np

# Small shapes that still exercise GQA (H=4, K=2), an explicit head_dim and tied/untied heads.
BASE = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip

CASES = {
    "llama_gqa_untied": ("llama", dict(tie_word_embeddings=False, rope_theta=10_000.0)),
    "llama3_rope_scaling_tied": (
        "llama",
        dict(
            tie_word_embeddings=True,
            max_position_embeddings=256,
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=32,
            ),
        ),
    ),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "qwen2_untied_mha": ("qwen2", dict(tie_word_embeddings=False, num_key_value_heads=4)),
    "qwen3_head_dim": ("qwen3", dict(tie_word_embeddings=True, head_dim=16)),
    "qwen3_untied": ("qwen3", dict(tie_word_embeddings=False, head_dim=12)),
}  # fmt: skip


def build_torch_model(family: str, seed: int = 0, dtype: str = "float32", **overrides):
    import torch
    import transformers

    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    kwargs = {**BASE, **overrides}
    config = cls[0](**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    return model


def save_case(case: str, root, seed: int = 0, dtype: str = "float32"):
    """Build the named case and save it (safetensors) under root/case; returns (path, model)."""
    family, overrides = CASES[case]
    model = build_torch_model(family, seed=seed, dtype=dtype, **overrides)
    path = os.path.join(str(root), case)
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
        )
    return out.logits.float().numpy()


def load_torch(path: str):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, attn_implementation="eager"
    )
    return model.eval()


def random_right_padded(rng: np.random.Generator, vocab: int, batch: int, length: int):
    """Tokens [B, L] and a right-padding mask with row lengths between 1 and L (one full row)."""
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    tokens = rng.integers(3, vocab, size=(batch, length))
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    tokens = np.where(mask == 1, tokens, 0)
    return tokens, mask
