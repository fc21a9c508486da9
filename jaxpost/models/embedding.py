"""The embedding lookup, with a backward that builds the table's gradient by a gather.

    dE[v] = Σ_{n : t_n = v} g_n           (E [V, D], tokens t [N], cotangent g [N, D])

Autodiff of `jnp.take` writes this with a scatter-add into a zero [V, D] table. XLA:CPU runs a
bfloat16 scatter-add in float32, so the backward of a bf16 model holds a float32 [V, D] buffer:
at Qwen2.5-0.5B's shape (V = 151,936, D = 896) 0.54 GB of temporaries for the lookup alone
(XLA:CPU, 2-core CPU, 2026-12-02), twice the bf16 gradient it produces; with a fused-linear loss
that buffer is the one part of the train step that still grows with V.

Here the backward sorts the N tokens, sums the cotangent rows of equal tokens in float32
(float64 for a float64 table; an [N, D] array: the segments are the distinct tokens), and then
*gathers* row v of the gradient from those sums (zero where v does not occur), writing the
[V, D] gradient once, in the table's dtype:
0.03 GB of temporaries at the same shape. The arithmetic is the scatter's (float32 sums, one
rounding to the table's dtype); only the order of the additions within a token's rows may differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def lookup(table_VxD: jax.Array, tokens: jax.Array) -> jax.Array:
    """`table[tokens]` (any token shape), differentiable in the table.

    Under a multi-device mesh (`jax.set_mesh`) this is plain `jnp.take`: each device's scatter
    buffer is then only its shard of the table, and XLA:CPU's partitioning of the sort-and-gather
    backward deadlocked its collectives on a (1, 2, 4) mesh (jax 0.10.2, tests/
    test_train_fused_mesh.py), so the gather form is kept to one device, where it pays."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return jnp.take(table_VxD, tokens, axis=0)
    return _lookup(table_VxD, tokens)


@jax.custom_vjp
def _lookup(table_VxD: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take(table_VxD, tokens, axis=0)


def _fwd(table_VxD, tokens):
    # The table is an input of the program already: keeping it as a residual copies nothing.
    return jnp.take(table_VxD, tokens, axis=0), (tokens, table_VxD)


def _bwd(residual, g):
    tokens, table = residual
    vocab, width = table.shape
    flat = tokens.reshape(-1)
    flat = jnp.where(flat < 0, flat + vocab, flat)  # `take` reads t < 0 as row V + t
    n = flat.shape[0]
    order = jnp.argsort(flat)
    sorted_tokens = flat[order]
    rows = g.reshape(n, width)[order].astype(jnp.promote_types(table.dtype, jnp.float32))
    starts = jnp.concatenate([jnp.ones((1,), bool), sorted_tokens[1:] != sorted_tokens[:-1]])
    segment = jnp.cumsum(starts) - 1  # which distinct token each sorted row belongs to
    sums_NxD = jax.ops.segment_sum(rows, segment, num_segments=n, indices_are_sorted=True)
    # The distinct tokens in ascending order, padded with V (past every real token).
    distinct = jnp.full((n,), vocab, flat.dtype).at[segment].set(sorted_tokens)
    ids = jnp.arange(vocab, dtype=flat.dtype)
    where = jnp.minimum(jnp.searchsorted(distinct, ids), n - 1)
    present = distinct[where] == ids
    grad = jnp.where(present[:, None], sums_NxD[where].astype(table.dtype),
                     jnp.zeros((), table.dtype))  # fmt: skip
    return grad, np.zeros(tokens.shape, jax.dtypes.float0)


_lookup.defvjp(_fwd, _bwd)
