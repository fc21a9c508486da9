"""A decoder-only transformer in Flax NNX covering Llama-3, Qwen2/2.5 and Qwen3.

Shape letters: B batch, T query length, S key (cache) length, D model width, H query heads,
K key/value heads, G = H / K query heads per kv head, E head_dim, F MLP width, V vocabulary.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (names from
`LOGICAL_AXES`), from which `jaxpost.sharding` derives mesh shardings. The numerics follow the
Hugging Face reference implementations: RMSNorm in float32 then cast back, rotate-half rotary
embeddings with float32 frequencies, softmax in float32.

Attention masks are built from *slots* rather than positions: a query in slot i may attend a key
in slot j when j <= i and slot j holds a real token. Positions (what rope sees) are counted per
row from its first real token, so padding, left or right, never changes a real token's logits.

Under `jax.set_mesh(mesh)` the residual stream and the logits are pinned to batch-split layouts
(`jaxpost.sharding.with_logical_constraint`), so FSDP splits activations by examples rather than
following the weights' embed-dim split; without a mesh, or on one device, these are identities.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpost.models.configs import ModelConfig

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers")

_init = nnx.initializers.normal(stddev=0.02)


def _constrain(x, *logical_axes):
    """Pin an activation's layout by logical axes under `jax.set_mesh`; identity without a mesh.
    (`jaxpost.sharding` imports this package, hence the import at trace time.)"""
    from jaxpost import sharding

    return sharding.with_logical_constraint(x, logical_axes)


_RESIDUAL = ("batch", "length", "residual")


def _param(rngs: nnx.Rngs | None, shape, dtype, axes, init=_init) -> nnx.Param:
    value = init(rngs.params(), shape, dtype) if rngs is not None else jnp.zeros(shape, dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float, dtype, axis_name: str):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype), logical_axes=(axis_name,))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        return scale * normed.astype(x.dtype)


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


def apply_rope(x_BxTxNxE, positions_BxT, inv_freq):
    """Rotate-half rotary embedding: x·cos + rotate_half(x)·sin, angles = position · inv_freq."""
    angles = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # B,T,1,E
    cos, sin = jnp.cos(angles).astype(x_BxTxNxE.dtype), jnp.sin(angles).astype(x_BxTxNxE.dtype)
    half = x_BxTxNxE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxE[..., half:], x_BxTxNxE[..., :half]], axis=-1)
    return x_BxTxNxE * cos + rotated * sin


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        c = config
        D, H, K, E = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        pd = c.weight_dtype
        self.config = c
        self.q = _param(rngs, (D, H, E), pd, ("embed", "heads", "head_dim"))
        self.k = _param(rngs, (D, K, E), pd, ("embed", "kv_heads", "head_dim"))
        self.v = _param(rngs, (D, K, E), pd, ("embed", "kv_heads", "head_dim"))
        self.o = _param(rngs, (H, E, D), pd, ("heads", "head_dim", "embed"))
        if c.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, (H, E), pd, ("heads", "head_dim"), zeros)
            self.k_bias = _param(rngs, (K, E), pd, ("kv_heads", "head_dim"), zeros)
            self.v_bias = _param(rngs, (K, E), pd, ("kv_heads", "head_dim"), zeros)
        if c.qk_norm:
            self.q_norm = RMSNorm(E, c.norm_eps, pd, "head_dim")
            self.k_norm = RMSNorm(E, c.norm_eps, pd, "head_dim")

    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, kv_cache=None, cache_index=None):
        c = self.config
        dt = c.compute_dtype
        x = x_BxTxD.astype(dt)
        q = jnp.einsum("btd,dhe->bthe", x, self.q[...].astype(dt))
        k = jnp.einsum("btd,dke->btke", x, self.k[...].astype(dt))
        v = jnp.einsum("btd,dke->btke", x, self.v[...].astype(dt))
        if c.qkv_bias:
            q = q + self.q_bias[...].astype(dt)[None, None]
            k = k + self.k_bias[...].astype(dt)[None, None]
            v = v + self.v_bias[...].astype(dt)[None, None]
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(c)
        q = apply_rope(q, positions_BxT, inv_freq)
        k = apply_rope(k, positions_BxT, inv_freq)

        # Keys and values live as [B, K, S, E]: batch dims (B, K) lead and E is contiguous, the
        # layout XLA's dot wants, so attention over a long cache never transposes the cache.
        k = jnp.swapaxes(k, 1, 2)
        v = jnp.swapaxes(v, 1, 2)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            new_cache = (k, v)
        else:
            new_cache = None

        B, T = x.shape[:2]
        K, G, E = c.n_kv_heads, c.group_size, c.head_dim
        # [B, T, H, E] -> [B, K, G·T, E]: the G query heads sharing a kv head become rows.
        q = q.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)
        scores = jnp.einsum(
            "bkqe,bkse->bkqs", q, k.astype(dt), preferred_element_type=jnp.float32
        ) * (E**-0.5)
        scores = scores.reshape(B, K, G, T, -1)
        scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(B, K, G * T, -1)
        out = jnp.einsum("bkqs,bkse->bkqe", probs, v.astype(dt))
        out = out.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, c.n_heads, E)
        return jnp.einsum("bthe,hed->btd", out, self.o[...].astype(dt)), new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(x·gate) * (x·up))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        D, F, pd = config.d_model, config.mlp_dim, config.weight_dtype
        self.dtype = config.compute_dtype
        self.gate = _param(rngs, (D, F), pd, ("embed", "mlp"))
        self.up = _param(rngs, (D, F), pd, ("embed", "mlp"))
        self.down = _param(rngs, (F, D), pd, ("mlp", "embed"))

    def __call__(self, x_BxTxD):
        dt = self.dtype
        x = x_BxTxD.astype(dt)
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return h @ self.down[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        pd = config.weight_dtype
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, pd, "embed")
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, pd, "embed")
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
        h, new_cache = self.attn(self.attn_norm(x), positions, mask, kv_cache, cache_index)
        x = _constrain(x + h, *_RESIDUAL)
        x = _constrain(x + self.mlp(self.mlp_norm(x)), *_RESIDUAL)
        return x, new_cache


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.nothing_saveable


class Transformer(nnx.Module):
    """Embedding, `n_layers` blocks, final RMSNorm and (tied or untied) LM head."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        c = config
        self.config = c
        self.embed = _param(rngs, (c.vocab_size, c.d_model), c.weight_dtype, ("vocab", "embed"))
        self.layers = nnx.List([Block(c, rngs) for _ in range(c.n_layers)])
        self.final_norm = RMSNorm(c.d_model, c.norm_eps, c.weight_dtype, "embed")
        if not c.tie_embeddings:
            self.lm_head = _param(
                rngs, (c.d_model, c.vocab_size), c.weight_dtype, ("embed", "vocab")
            )

    def head_weight(self):
        """The LM-head weight [D, V] (the transposed embedding table when tied)."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

    def hidden(self, tokens_BxT, positions_BxT, mask_BxTxS, kv_caches=None, cache_index=None):
        """Final-normed hidden states [B, T, D] and the updated per-layer caches."""
        c = self.config
        x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(c.compute_dtype)
        # Under FSDP the batch, not the weights' embed dim, decides the residual stream's layout.
        x = _constrain(x, *_RESIDUAL)
        new_caches = []
        for i, layer in enumerate(self.layers):
            cache_i = None if kv_caches is None else kv_caches[i]
            if c.remat != "none" and kv_caches is None:
                call = nnx.remat(lambda blk, *a: blk(*a), policy=_remat_policy(c.remat))
                x, new_cache = call(layer, x, positions_BxT, mask_BxTxS)
            else:
                x, new_cache = layer(x, positions_BxT, mask_BxTxS, cache_i, cache_index)
            new_caches.append(new_cache)
        return _constrain(self.final_norm(x), *_RESIDUAL), new_caches

    def logits(self, hidden_BxTxD):
        """float32 logits [B, T, V]; the matmul accumulates in float32 whatever the dtype."""
        dt = self.config.compute_dtype
        logits = jnp.einsum(
            "btd,dv->btv",
            hidden_BxTxD.astype(dt),
            self.head_weight().astype(dt),
            preferred_element_type=jnp.float32,
        )
        return _constrain(logits, "batch", "length", "vocab")
