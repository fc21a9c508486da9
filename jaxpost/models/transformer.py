"""A decoder-only transformer in Flax NNX covering Llama-3, Qwen2/2.5 and Qwen3.

Shape letters: B batch, T query length, S key (cache) length, D model width, H query heads,
K key/value heads, G = H / K query heads per kv head, E head_dim, F MLP width, V vocabulary.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (names from
`LOGICAL_AXES`), from which `jaxpost.sharding` derives mesh shardings. The blocks' parameters
are stacked: `layers` is one `Block` whose every parameter has a leading [n_layers] axis
(logical axis "layers"). Training and teacher-forced passes apply it with `jax.lax.scan` over
the stack (`config.scan_layers`, the default) or a Python loop over its slices, under the remat
policy (`jax.checkpoint` around one block: under the scan XLA keeps the rematerialization, in an
unrolled loop XLA:CPU undoes it). Prefill and decode loop over the layers, each with its own KV
cache buffer. The numerics follow the Hugging Face reference implementations: RMSNorm in float32
then cast back, rotate-half rotary embeddings with float32 frequencies, softmax in float32.

Attention masks are built from *slots* rather than positions: a query in slot i may attend a key
in slot j when j <= i and slot j holds a real token. Positions (what rope sees) are counted per
row from its first real token, so padding, left or right, never changes a real token's logits.

Under `jax.set_mesh(mesh)` the residual stream and the logits are pinned to batch-split layouts
(`partitioning.with_logical_constraint`), so FSDP splits activations by examples rather than
following the weights' embed-dim split; without a mesh, or on one device, these are identities.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxpost.models import embedding
from jaxpost.models.configs import ModelConfig
from jaxpost.models.partitioning import with_logical_constraint
from jaxpost.models.rope import apply_rope, rope_inv_freq, rope_table, rotation

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers")

_init = nnx.initializers.normal(stddev=0.02)

# What each remat policy saves of a block's forward for its backward; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint: every residual of the backward is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input (the scan carry)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections' outputs
    "attn": jax.checkpoint_policies.save_only_these_names("attn_out"),  # attention's output
}


def _constrain(x, *logical_axes):
    """Pin an activation's layout by logical axes under `jax.set_mesh`; identity without a mesh."""
    return with_logical_constraint(x, logical_axes)


_RESIDUAL = ("batch", "length", "residual")


def dense(x, w, in_dims: int = 1):
    """x [..., *w.shape[:in_dims]] contracted with w: one 2-D matmul [rows, in] @ [in, out].

    The leading (batch, length) axes are folded into rows and w's input and output axes into
    one each, so the dot and both of its gradients are plain 2-D matmuls. XLA:CPU emits a
    [B, T, D] x [D, F] einsum's backward (contracting over B and T) and the elementwise ops
    fused around it far slower: an isolated SwiGLU MLP's value-and-grad took 39 ms at
    B·T = 4096, D = 96, F = 256 as einsums against 14 ms folded (2-core CPU, 2026-12-02;
    benchmarks/paradigms_budget.md).
    """
    lead = x.shape[: x.ndim - in_dims]
    n_in = math.prod(w.shape[:in_dims])
    out = x.reshape(-1, n_in) @ w.reshape(n_in, -1)
    return out.reshape(*lead, *w.shape[in_dims:])


def _param(rngs, shape, dtype, axes, init=_init, stack=None) -> nnx.Param:
    """A parameter; with `stack` = n, n draws along a leading "layers" axis, one per layer from
    the n keys `rngs.params()` then returns (`_LayerKeys`)."""
    key = None if rngs is None else rngs.params()
    if stack is not None:
        axes = ("layers", *axes)
        if key is None:
            shape = (stack, *shape)
        else:
            return nnx.Param(jax.vmap(lambda k: init(k, shape, dtype))(key), logical_axes=axes)
    value = jnp.zeros(shape, dtype) if key is None and init is _init else init(key, shape, dtype)
    return nnx.Param(value, logical_axes=axes)


class _LayerKeys:
    """Keys for a stack of n blocks, drawn as n separate blocks would draw them: all n·P keys
    are taken from `rngs` in block order up front (P: draws per block), and the block's j-th
    parameter gets the j-th key of every block. So stacked initialization equals, draw for
    draw, initializing the blocks one after another (the layout before the stack)."""

    def __init__(self, rngs: nnx.Rngs, n_layers: int, per_block: int):
        self._keys = [rngs.params() for _ in range(n_layers * per_block)]
        self._n, self._per_block, self._drawn = n_layers, per_block, 0

    def params(self):
        j, self._drawn = self._drawn, self._drawn + 1
        if j >= self._per_block:
            raise RuntimeError(f"a block drew more than the {self._per_block} keys planned")
        return jnp.stack([self._keys[i * self._per_block + j] for i in range(self._n)])


def _draws_per_block(config: ModelConfig) -> int:
    """q, k, v, o, (q/k/v biases, zero-initialised but drawn for), gate, up, down."""
    return 7 + (3 if config.qkv_bias else 0)


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 and cast back (as HF does)."""

    def __init__(self, dim: int, eps: float, dtype, axis_name: str, stack: int | None = None):
        self.eps = eps
        self.scale = _param(None, (dim,), dtype, (axis_name,), _ones, stack)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        return scale * normed.astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def masked_softmax(scores, bias, scale: float):
    """softmax(scores · scale + bias) over the last axis, in float32; `bias` (0 or a large
    negative number, broadcastable to `scores`) carries the mask.

    The forward is `jax.nn.softmax`'s arithmetic. The derivative is the softmax's own, dp =
    p · (dz − Σ p·dz), linear in dz given p alone, so the backward (its transpose) reads only
    the probabilities, where autodiff of the forward's exp / sum keeps the exponentials and the
    sums and multiplies by broadcasts of them: on XLA:CPU those broadcasts are materialized as
    [B, K, G, T, S] operands of the fused dots. The train step at the head-to-head's shapes ran
    3–10% faster (AMD EPYC Zen 5 2-core CPU, 2026-12-05; benchmarks/paradigms_budget.md). A
    JVP rather than a VJP, so remat policies and the layer scan treat it as any other op."""
    z = scores * scale + bias
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@masked_softmax.defjvp
def _masked_softmax_jvp(scale, primals, tangents):
    scores, bias = primals
    d_scores, d_bias = tangents
    p = masked_softmax(scores, bias, scale)
    dz = d_scores * scale + d_bias
    return p, p * (dz - jnp.sum(p * dz, axis=-1, keepdims=True))


class Attention(nnx.Module):
    """Grouped-query attention with optional q/k/v bias (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None, stack: int | None = None):
        c = config
        D, H, K, E = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
        pd = c.weight_dtype
        self.config = c
        self.q = _param(rngs, (D, H, E), pd, ("embed", "heads", "head_dim"), stack=stack)
        self.k = _param(rngs, (D, K, E), pd, ("embed", "kv_heads", "head_dim"), stack=stack)
        self.v = _param(rngs, (D, K, E), pd, ("embed", "kv_heads", "head_dim"), stack=stack)
        self.o = _param(rngs, (H, E, D), pd, ("heads", "head_dim", "embed"), stack=stack)
        if c.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, (H, E), pd, ("heads", "head_dim"), zeros, stack)
            self.k_bias = _param(rngs, (K, E), pd, ("kv_heads", "head_dim"), zeros, stack)
            self.v_bias = _param(rngs, (K, E), pd, ("kv_heads", "head_dim"), zeros, stack)
        if c.qk_norm:
            self.q_norm = RMSNorm(E, c.norm_eps, pd, "head_dim", stack)
            self.k_norm = RMSNorm(E, c.norm_eps, pd, "head_dim", stack)

    def __call__(self, x_BxTxD, rotation_BxTx1xE, mask_BxTxS, cache=None, cache_index=None,
                 qkv=None):  # fmt: skip
        """Attention output [B, T, D], the tokens' rotary (cos, sin) from `rope.rotation`; with
        `cache` = (k_BxKxExS, v_BxKxSxE), this layer's cache, the new keys and values are
        written at slots [cache_index, cache_index + T), attention reads the whole cache, and
        the updated (k, v) return. `qkv`: this layer's q, k and v weights as one
        [D, (H + 2K)·E] matrix (`fused_weights`), one matmul."""
        c = self.config
        dt = c.compute_dtype
        x = x_BxTxD.astype(dt)
        if qkv is None:
            q = dense(x, self.q[...].astype(dt))
            k = dense(x, self.k[...].astype(dt))
            v = dense(x, self.v[...].astype(dt))
        else:
            H, E = c.n_heads, c.head_dim
            parts = jnp.split(dense(x, qkv), [H * E, (H + c.n_kv_heads) * E], axis=-1)
            q, k, v = (p.reshape(*x.shape[:2], -1, E) for p in parts)
        if c.qkv_bias:
            q = q + self.q_bias[...].astype(dt)[None, None]
            k = k + self.k_bias[...].astype(dt)[None, None]
            v = v + self.v_bias[...].astype(dt)[None, None]
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, rotation_BxTx1xE)
        k = apply_rope(k, rotation_BxTx1xE)

        # Values live as [B, K, S, E] (batch dims lead, E contiguous: the layout XLA's dot
        # wants), keys too without a cache (training). A cache holds keys as [B, K, E, S], so a
        # decode step's scores are [G, E] @ [E, S] per (row, kv head): generation 8% faster on
        # XLA:CPU (Zen 5 2-core CPU, 2026-12-06; benchmarks/paradigms_budget.md).
        v = jnp.swapaxes(v, 1, 2)
        new_cache = None
        if cache is None:
            k = jnp.swapaxes(k, 1, 2)
            spec = "bkqe,bkse->bkqs"
        else:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).astype(
                k_cache.dtype), (0, 0, 0, cache_index))  # fmt: skip
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype),
                                             (0, 0, cache_index, 0))  # fmt: skip
            new_cache = (k, v)
            spec = "bkqe,bkes->bkqs"

        B, T = x.shape[:2]
        K, G, E = c.n_kv_heads, c.group_size, c.head_dim
        # [B, T, H, E] -> [B, K, G·T, E]: the G query heads sharing a kv head become rows.
        q = q.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)
        scores = jnp.einsum(spec, q, k.astype(dt), preferred_element_type=jnp.float32)
        # An additive mask (0 or float32 min): the same numbers as a `where`, but its derivative
        # needs nothing saved, where a `where` keeps a [B, K, G, T, S] mask for the backward.
        bias = jnp.where(mask_BxTxS, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]
        probs = masked_softmax(scores.reshape(B, K, G, T, -1), bias, E**-0.5)
        probs = probs.astype(dt).reshape(B, K, G * T, -1)
        out = jnp.einsum("bkqs,bkse->bkqe", probs, v.astype(dt))
        out = out.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, c.n_heads, E)
        out = checkpoint_name(out, "attn_out")  # what remat="attn" keeps
        return dense(out, self.o[...].astype(dt), in_dims=2), new_cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(x·gate) * (x·up))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None, stack: int | None = None):
        D, F, pd = config.d_model, config.mlp_dim, config.weight_dtype
        self.dtype = config.compute_dtype
        self.gate = _param(rngs, (D, F), pd, ("embed", "mlp"), stack=stack)
        self.up = _param(rngs, (D, F), pd, ("embed", "mlp"), stack=stack)
        self.down = _param(rngs, (F, D), pd, ("mlp", "embed"), stack=stack)

    def __call__(self, x_BxTxD, gate_up=None):
        """`gate_up`: the gate and up weights as one [D, 2F] matrix (`fused_weights`)."""
        dt = self.dtype
        x = x_BxTxD.astype(dt)
        if gate_up is None:
            gate, up = dense(x, self.gate[...].astype(dt)), dense(x, self.up[...].astype(dt))
        else:
            gate, up = jnp.split(dense(x, gate_up), 2, axis=-1)
        return dense(jax.nn.silu(gate) * up, self.down[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `stack` = n it holds n blocks' parameters along a leading "layers" axis; call a slice
    of it (`Transformer.hidden` does, by scan or loop), not the stack itself.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None, stack: int | None = None):
        pd = config.weight_dtype
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, pd, "embed", stack)
        self.attn = Attention(config, rngs, stack)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, pd, "embed", stack)
        self.mlp = MLP(config, rngs, stack)

    def __call__(self, x, rot, mask, cache=None, cache_index=None, fused=None):
        """`rot`: the tokens' rotary (cos, sin) (`rope.rotation`); `fused`: this block's
        `fused_weights` (a decode loop's), or None."""
        fused = fused or {}
        h, new_cache = self.attn(self.attn_norm(x), rot, mask, cache, cache_index,
                                 fused.get("qkv"))  # fmt: skip
        x = _constrain(x + h, *_RESIDUAL)
        x = _constrain(x + self.mlp(self.mlp_norm(x), fused.get("gate_up")), *_RESIDUAL)
        return x, new_cache

    def fused_weights(self) -> dict:
        """One block's q/k/v and gate/up weights concatenated in the compute dtype: [D, (H + 2K)·E]
        and [D, 2F], so a decode step runs two matmuls where it would run five. Built once,
        outside a decode loop (`functional.layer_params`)."""
        a, m, dt = self.attn, self.mlp, self.mlp.dtype
        D = a.config.d_model
        qkv = jnp.concatenate([w[...].reshape(D, -1) for w in (a.q, a.k, a.v)], axis=1)
        gate_up = jnp.concatenate([m.gate[...], m.up[...]], axis=1)
        return {"qkv": qkv.astype(dt), "gate_up": gate_up.astype(dt)}


class Transformer(nnx.Module):
    """Embedding, `n_layers` stacked blocks, final RMSNorm and (tied or untied) LM head."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs | None):
        c = config
        self.config = c
        self.embed = _param(rngs, (c.vocab_size, c.d_model), c.weight_dtype, ("vocab", "embed"))
        keys = None if rngs is None else _LayerKeys(rngs, c.n_layers, _draws_per_block(c))
        self.layers = Block(c, keys, stack=c.n_layers)
        self.final_norm = RMSNorm(c.d_model, c.norm_eps, c.weight_dtype, "embed")
        if not c.tie_embeddings:
            self.lm_head = _param(
                rngs, (c.d_model, c.vocab_size), c.weight_dtype, ("embed", "vocab")
            )

    def head_weight(self):
        """The LM-head weight [D, V] (the transposed embedding table when tied)."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

    def hidden(self, tokens_BxT, positions_BxT, mask_BxTxS, caches=None, cache_index=None,
               layers=None):  # fmt: skip
        """Final-normed hidden states [B, T, D] and, with `caches` (one (k, v) pair per layer,
        keys [B, K, E, S], values [B, K, S, E]), the updated caches.

        Without caches (training, teacher forcing) the blocks run as `config.scan_layers` says,
        under the remat policy. With caches (prefill and decode) they always run as a Python
        loop, each layer writing its new keys and values into its own cache buffer in place.
        `layers` are the blocks' parameters already sliced per layer, each with its fused
        weights (`functional.layer_params`): a decode loop passes them in, because XLA:CPU
        copies slices of the stack (and concatenations) taken inside the loop on every step."""
        c = self.config
        # The table's gradient is built by a gather, not a float32 scatter (see embedding.py).
        x = embedding.lookup(self.embed[...], tokens_BxT).astype(c.compute_dtype)
        # Under FSDP the batch, not the weights' embed dim, decides the residual stream's layout.
        x = _constrain(x, *_RESIDUAL)
        # Positions lie in [0, T) without a cache, in [0, S) with one (S its slots); the
        # rotation is read once here, not in every layer.
        slots = tokens_BxT.shape[1] if caches is None else caches[0][0].shape[-1]
        rot = rotation(rope_table(rope_inv_freq(c), slots), positions_BxT)
        graphdef, stack = nnx.split(self.layers)
        layer = lambda i: jax.tree.map(lambda a: a[i], stack)  # noqa: E731

        if caches is not None:
            new_caches = []
            for i, cache in enumerate(caches):
                tree, fused = (layer(i), None) if layers is None else layers[i]
                blk = nnx.merge(graphdef, tree)
                x, new_cache = blk(x, rot, mask_BxTxS, cache, cache_index, fused)
                new_caches.append(new_cache)
            return _constrain(self.final_norm(x), *_RESIDUAL), new_caches

        def block(layer_params, x):
            return nnx.merge(graphdef, layer_params)(x, rot, mask_BxTxS)[0]

        if c.remat != "none":
            # Inside a scan the body's boundary already keeps XLA from merging the
            # recomputation into the forward, so CSE need not be prevented (jax's advice).
            block = jax.checkpoint(
                block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers
            )
        if c.scan_layers:
            x, _ = jax.lax.scan(lambda h, p: (block(p, h), None), x, stack)
        else:
            for i in range(c.n_layers):
                x = block(layer(i), x)
        return _constrain(self.final_norm(x), *_RESIDUAL), None

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
