"""Rotary position embeddings: the inverse frequencies, and cos/sin read from a table.

The rotation's cos and sin depend only on the position, so they are computed once for the
positions [0, length) a call can hold and gathered per token once per forward pass
(`rotation`, shared by every layer), rather than evaluated per token, head and layer: XLA fuses
the transcendentals into every q and k fusion that consumes them, and those fusions took ~14%
of the head-to-head's SFT step. Read from a table the sft, grpo and opd steps ran 10–14% faster
(AMD EPYC Zen 5 2-core CPU, 2026-12-06; benchmarks/paradigms_budget.md).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models.configs import ModelConfig


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies [E/2] in float32, with Llama-3 scaling when configured."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones kept.
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_table(inv_freq, length: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin of angle = position · inv_freq for positions [0, length), each [length, E]
    float32 (the E/2 angles twice, as rotate-half pairs them). The angle is the float32 product
    a per-token evaluation computes; cos and sin of it may differ in the last bit from a
    per-token evaluation's, as XLA may fold the table at compile time (logprobs moved by up to
    1.4e-6 in the sampler, 2026-12-06)."""
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotation(table, positions_BxT) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, E] of each token's position, read from `table` (`rope_table`):
    gathered once per forward pass and shared by every layer's q and k. A position outside the
    table reads NaN, so the outputs say so rather than wrapping to a wrong angle."""
    return tuple(jnp.take(t, positions_BxT, axis=0, mode="fill", fill_value=jnp.nan)[:, :, None]
                 for t in table)  # fmt: skip


def apply_rope(x_BxTxNxE, rotation_BxTx1xE):
    """Rotate-half rotary embedding: x·cos + rotate_half(x)·sin, with (cos, sin) per token
    from `rotation`."""
    cos, sin = (t.astype(x_BxTxNxE.dtype) for t in rotation_BxTx1xE)
    half = x_BxTxNxE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxE[..., half:], x_BxTxNxE[..., :half]], axis=-1)
    return x_BxTxNxE * cos + rotated * sin
