"""The pure functional face of the model: parameters are a plain nested dict of arrays.

`init` builds them, `apply` maps tokens to logits, and `forward_cached` is the incremental path
the sampler uses. Each call merges the (cached, static) NNX graph definition of the config with
the parameter dict inside the trace, so every function here is a pure function of arrays and can
be jitted, differentiated and sharded like any other.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxpost.errors import UserError
from jaxpost.models.configs import ModelConfig
from jaxpost.models.transformer import Transformer


@functools.lru_cache(maxsize=64)
def _graph(config: ModelConfig):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0))))
    return graphdef, abstract_state


def _model(config: ModelConfig, params) -> Transformer:
    return nnx.merge(_graph(config)[0], params)


def init(config: ModelConfig, seed: int | jax.Array = 0) -> dict:
    """Random parameters (normal(0.02) weights, zero biases, unit norms) as a nested dict."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    model = Transformer(config, nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(config: ModelConfig) -> dict:
    """`jax.ShapeDtypeStruct` for every parameter, without allocating anything."""
    return jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
        nnx.to_pure_dict(_graph(config)[1]),
    )


def logical_axes(config: ModelConfig) -> dict:
    """The logical axis names of every parameter, a tree matching `init`'s (tuples as leaves)."""
    state = _graph(config)[1]
    named = jax.tree.map(
        lambda v: v.get_metadata()["logical_axes"],
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.to_pure_dict(named)


def check_tokens(config: ModelConfig, tokens) -> None:
    """Raise if concrete token ids fall outside [0, vocab_size); a no-op under tracing."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= config.vocab_size):
        raise UserError(
            f"token ids must lie in [0, {config.vocab_size}) for this model; got min "
            f"{int(arr.min())}, max {int(arr.max())}"
        )


def positions_from_mask(mask_BxL) -> jax.Array:
    """Position of each slot counted from the first real token of its segment (0-based).

    `mask_BxL` is 0 on padding and, on real tokens, 1, or the token's segment id in a packed
    row (several examples side by side, ids 1, 2, ... increasing along the row): a segment's
    positions start at 0 where its id first exceeds every id before it. A 0/1 mask is one
    segment per row, so positions count from the row's first real token."""
    seg = mask_BxL.astype(jnp.int32)
    count = jnp.cumsum(seg > 0, axis=-1, dtype=jnp.int32)
    before = jnp.concatenate([jnp.zeros_like(seg[:, :1]), jax.lax.cummax(seg, axis=1)[:, :-1]], 1)
    offset = jax.lax.cummax(jnp.where(seg > before, count - 1, 0), axis=1)
    return jnp.maximum(count - 1 - offset, 0)


def _full_mask(attention_mask_BxL) -> jax.Array:
    """[B, L, L]: slot i attends slot j <= i holding a real token of its own segment (a padding
    slot attends every real slot before it: its output is defined, never used)."""
    L = attention_mask_BxL.shape[-1]
    causal = jnp.tril(jnp.ones((L, L), dtype=bool))
    seg = attention_mask_BxL.astype(jnp.int32)
    same = (seg[:, :, None] == seg[:, None, :]) | (seg[:, :, None] == 0)
    return causal[None] & (seg > 0)[:, None, :] & same


def hidden_states(config: ModelConfig, params, tokens_BxL, attention_mask_BxL=None) -> jax.Array:
    """Final-normed hidden states [B, L, D] (the input of the LM head)."""
    check_tokens(config, tokens_BxL)
    if attention_mask_BxL is None:
        attention_mask_BxL = jnp.ones(tokens_BxL.shape, dtype=bool)
    positions = positions_from_mask(attention_mask_BxL)
    hidden, _ = _model(config, params).hidden(tokens_BxL, positions, _full_mask(attention_mask_BxL))
    return hidden


def head_weight(config: ModelConfig, params) -> jax.Array:
    """The LM-head weight [D, V] (the transposed embedding when embeddings are tied)."""
    return params["embed"].T if config.tie_embeddings else params["lm_head"]


def apply(config: ModelConfig, params, tokens_BxL, attention_mask_BxL=None) -> jax.Array:
    """Logits [B, L, V] in float32 for a (possibly padded) batch of token sequences.

    `attention_mask_BxL` marks real tokens (1) and padding (0), on either side. Positions count
    from 0 at each row's first real token and a real token never attends padding, so a real
    token's logits do not depend on the padding around it. A packed row marks its examples'
    tokens with segment ids 1, 2, ... instead (`positions_from_mask`): each example then has
    its own positions and attends only itself, so its logits are those it has alone in a row.
    Logits at padded slots are defined but meaningless.
    """
    check_tokens(config, tokens_BxL)
    if attention_mask_BxL is None:
        attention_mask_BxL = jnp.ones(tokens_BxL.shape, dtype=bool)
    model = _model(config, params)
    positions = positions_from_mask(attention_mask_BxL)
    hidden, _ = model.hidden(tokens_BxL, positions, _full_mask(attention_mask_BxL))
    return model.logits(hidden)


@struct.dataclass
class KVCache:
    """Preallocated keys and values of every layer, plus which slots hold real tokens.

    k, v: tuples over layers of keys [B, K, E, S] and values [B, K, S, E] (kv heads lead and each
    is laid out as a decode step's attention reads it: scores = q @ keys, out = probs @ values,
    no transposes; `Attention`). One buffer per layer rather than a [n_layers, ...] stack like
    the parameters: decode updates each in place, one slot per step, and reads it whole (see
    `Transformer.hidden`). valid_BxS: bool, slot holds a real token.
    """

    k: tuple
    v: tuple
    valid_BxS: jax.Array

    @property
    def capacity(self) -> int:
        return self.valid_BxS.shape[1]


def init_cache(config: ModelConfig, batch: int, capacity: int, dtype=None) -> KVCache:
    """An empty cache of `capacity` slots per row (prompt plus generated tokens)."""
    if capacity > config.max_seq_len:
        raise UserError(
            f"cache capacity {capacity} exceeds the model's max_seq_len {config.max_seq_len}"
        )
    return empty_cache(config, batch, capacity, dtype or config.compute_dtype)


def cache_shapes(config: ModelConfig, batch: int, capacity: int) -> tuple[tuple, tuple]:
    """The shapes of one layer's keys [B, K, E, S] and values [B, K, S, E] (`KVCache`)."""
    K, E = config.n_kv_heads, config.head_dim
    return (batch, K, E, capacity), (batch, K, capacity, E)


def empty_cache(config: ModelConfig, batch: int, capacity: int, dtype) -> KVCache:
    """A zero cache of `capacity` slots, unchecked against max_seq_len (`init_cache` checks)."""
    k_shape, v_shape = cache_shapes(config, batch, capacity)

    def zeros(shape):
        return tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))

    return KVCache(k=zeros(k_shape), v=zeros(v_shape),
                   valid_BxS=jnp.zeros((batch, capacity), dtype=bool))  # fmt: skip


def grow_cache(cache: KVCache, capacity: int) -> KVCache:
    """The cache with empty slots appended up to `capacity` (keys and values zero, not valid):
    one copy, so a decode loop can run on a cache no larger than the slots it fills."""
    extra = capacity - cache.capacity
    if extra < 0:
        raise ValueError(f"cannot grow a cache of {cache.capacity} slots to {capacity}")

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    return KVCache(k=tuple(pad(k, 3) for k in cache.k), v=tuple(pad(v, 2) for v in cache.v),
                   valid_BxS=pad(cache.valid_BxS, 1))  # fmt: skip


def layer_params(config: ModelConfig, params) -> tuple:
    """The blocks' parameters as one (tree, fused weights) pair per layer: static slices of the
    stacked tree and `Block.fused_weights`. A decode loop takes them once, before the loop, and
    passes them to `forward_cached`."""
    graphdef, _ = nnx.split(_model(config, params).layers)
    out = []
    for i in range(config.n_layers):
        tree = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        out.append((tree, nnx.merge(graphdef, tree).fused_weights()))
    return tuple(out)


def forward_cached(
    config: ModelConfig,
    params,
    tokens_BxT,
    positions_BxT,
    token_mask_BxT,
    cache: KVCache,
    cache_index,
    *,
    last_only: bool = False,
    layers: tuple | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run T new tokens per row through the model, writing their keys/values at slots
    [cache_index, cache_index + T) of the cache.

    A new token in slot i attends every earlier or equal slot j <= i whose `valid` bit is set
    (including the new tokens themselves, by `token_mask_BxT`). Prefill is this call with the
    whole (padded) prompt and cache_index 0; each decode step is T = 1.

    Returns float32 logits [B, T, V] (or [B, 1, V] for the last slot only when `last_only`, which
    is what a left-padded prefill needs and saves a [B, T, V] head matmul) and the updated cache.
    Inside a loop, pass `layers=layer_params(config, params)` computed outside it: the same
    numbers, without copying every weight out of the stack on every step.
    """
    T = tokens_BxT.shape[1]
    valid = jax.lax.dynamic_update_slice(
        cache.valid_BxS, token_mask_BxT.astype(bool), (0, cache_index)
    )
    query_slots = cache_index + jnp.arange(T)
    key_slots = jnp.arange(cache.capacity)
    causal_TxS = key_slots[None, :] <= query_slots[:, None]
    mask_BxTxS = causal_TxS[None] & valid[:, None, :]
    model = _model(config, params)
    hidden, new = model.hidden(
        tokens_BxT, positions_BxT, mask_BxTxS, list(zip(cache.k, cache.v)), cache_index, layers
    )
    new_cache = KVCache(k=tuple(kv[0] for kv in new), v=tuple(kv[1] for kv in new), valid_BxS=valid)
    if last_only:
        hidden = hidden[:, -1:]
    return model.logits(hidden), new_cache
