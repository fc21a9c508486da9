"""Top-k teachers: distillation against the teacher's k most likely tokens plus a tail bucket.

A full-vocabulary teacher hands the student a ``[N, V]`` distribution per step (at V = 151,936
and N = 8192 tokens, 5 GB of float32 logits): too much to cache, to ship from a teacher on other
devices, or to keep beside the student. A top-k teacher keeps, per row, the indices of its k most
likely tokens, their log-probabilities and the log of the remaining mass (the tail bucket), k + 1
numbers instead of V; the divergence is then taken between the two (k + 1)-bucket distributions

    p_T = (p_T(i_1), …, p_T(i_k), 1 − Σ_j p_T(i_j)),   p_S = (p_S(i_1), …, p_S(i_k), 1 − Σ_j p_S(i_j))

(the student's probabilities at the teacher's indices, and the student's mass elsewhere). With
k = V it is the full divergence; the tail bucket keeps it a divergence between distributions
(Σ = 1) for any k, as in sparse knowledge distillation with a residual bucket.

  fused_linear_topk(hidden, head, k)              the teacher's TopK (indices, logp, log tail);
                                                  constants, never differentiated
  fused_linear_bucket_logprobs(hidden, head, idx) the student's log-probabilities at ``idx`` and
                                                  its log tail mass, ``[N, k + 1]``, differentiable
  bucket_divergence(student, teacher, alpha)      D_α between the bucket distributions (jnp; its
                                                  gradient by autodiff on [N, k + 1] arrays)

Both sweeps walk the vocabulary in blocks (kernels.linear_blocks): the ``[N, V]`` logits never
exist. Per block the student's sweep folds the online logsumexp of all columns and of the columns
outside ``idx`` (the tail, summed directly rather than as 1 − Σ, which would cancel when the top
k hold nearly all the mass) and picks the logits at ``idx``. Its backward, with cotangent b on
log p_S and s = softmax(x/τ), C = Σ_{j ≤ k+1} b_j, q the tail mass:

    ∂x_v = (−s_v C + 1[v ∉ idx] s_v b_tail / q + Σ_j 1[v = i_j] b_j) / τ

recomputing each block's logits (the ``idx`` terms are a scatter into the block). The teacher's
sweep keeps a running top-k (``lax.top_k`` of the block merged with the best so far) and then
runs the student's sweep at its indices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels import linear_blocks
from kernels.config import DEFAULT_BLOCK_SIZES, BlockSizes
from kernels.jsd import check_alpha_temperature, row_mask
from kernels.jsd_math import NEG_INF
from kernels.jsd_xla import vocab_blocks


class TopK(NamedTuple):
    """A top-k teacher's view of each row: what a student distils from, ``k + 1`` numbers a row.

    idx: int32 ``[N, k]`` token ids, most likely first. logp: float32 ``[N, k]`` their log
    softmax(x/τ). log_tail: float32 ``[N]`` log of the mass outside ``idx`` (−inf when none).
    """

    idx: jax.Array
    logp: jax.Array
    log_tail: jax.Array

    def buckets(self) -> jax.Array:
        """``[..., k + 1]`` log-probabilities of the k tokens and the tail."""
        return jnp.concatenate([self.logp, self.log_tail[..., None]], axis=-1)


@dataclasses.dataclass(frozen=True)
class _Config:
    temperature: float
    block_vocab: int
    head: linear_blocks.HeadSpec


def _prepare(hidden, head, temperature, mask, head_layout, compute_dtype, block_sizes):
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, D], got shape {hidden.shape}")
    vocab = linear_blocks.check_head("head", head, head_layout, hidden.shape[1])
    check_alpha_temperature(1.0, temperature)
    blocks = DEFAULT_BLOCK_SIZES["xla"] if block_sizes is None else block_sizes
    if not isinstance(blocks, BlockSizes):
        raise ValueError(f"block_sizes must be a kernels.BlockSizes, got {blocks!r}")
    dtype = linear_blocks.check_dtype("compute_dtype", compute_dtype)
    cfg = _Config(float(temperature), blocks.block_vocab, linear_blocks.HeadSpec(head_layout, dtype))
    valid = row_mask(mask, hidden.shape[0])
    hidden = jnp.where(valid[:, None], hidden, jnp.zeros((), hidden.dtype))
    return cfg, vocab, hidden, valid


def fused_linear_topk(hidden, head, k: int, *, temperature: float = 1.0, mask=None,
                      head_layout: str = "DV", compute_dtype=None,
                      block_sizes: BlockSizes | None = None) -> TopK:  # fmt: skip
    """The k most likely tokens of softmax(hidden @ head / τ) per row, their log-probabilities and
    the log tail mass, without the ``[N, V]`` logits; constants (no gradient). Masked rows give
    idx 0, logp 0 and log_tail 0. ValueError for k outside [1, min(V, block width)]."""
    cfg, vocab, hidden, valid = _prepare(hidden, head, temperature, mask, head_layout,
                                         compute_dtype, block_sizes)  # fmt: skip
    width, _ = vocab_blocks(vocab, cfg.block_vocab)
    if not isinstance(k, int) or not 1 <= k <= width:
        raise ValueError(f"k must be an int in [1, {width}] (V = {vocab}, block width {width}), "
                         f"got {k!r}")  # fmt: skip
    hidden, head = lax.stop_gradient(hidden), lax.stop_gradient(head)
    idx = _top_indices(cfg, hidden, head, k)
    buckets = _bucket_forward(cfg, hidden, head, idx)[0]
    buckets = jnp.where(valid[:, None], buckets, 0.0)
    return TopK(jnp.where(valid[:, None], idx, 0), buckets[:, :k], buckets[:, k])


def _top_indices(cfg: _Config, hidden, head, k: int):
    rows, vocab = hidden.shape[0], cfg.head.vocab(head)
    width, num_blocks = vocab_blocks(vocab, cfg.block_vocab)

    def step(b, state):
        best, ids = state
        start, new, x, _ = linear_blocks.block_logits(hidden, head, b, width, cfg.head)
        block_best, block_ids = lax.top_k(jnp.where(new, x, NEG_INF), k)
        merged, pos = lax.top_k(jnp.concatenate([best, block_best], axis=1), k)
        both = jnp.concatenate([ids, start + block_ids.astype(jnp.int32)], axis=1)
        return merged, jnp.take_along_axis(both, pos, axis=1)

    init = (jnp.full((rows, k), NEG_INF, jnp.float32), jnp.zeros((rows, k), jnp.int32))
    return lax.fori_loop(0, num_blocks, step, init)[1]


def fused_linear_bucket_logprobs(hidden, head, idx, *, temperature: float = 1.0, mask=None,
                                 head_layout: str = "DV", compute_dtype=None,
                                 block_sizes: BlockSizes | None = None) -> jax.Array:  # fmt: skip
    """``[N, k + 1]`` float32: log softmax(hidden @ head / τ) at ``idx`` ([N, k] distinct ids in
    [0, V) per row, e.g. a teacher's `TopK.idx`) and the log of the mass elsewhere; differentiable
    in hidden and head (module docstring), never forming ``[N, V]``. Masked rows give 0 and zero
    gradients."""
    cfg, vocab, hidden, valid = _prepare(hidden, head, temperature, mask, head_layout,
                                         compute_dtype, block_sizes)  # fmt: skip
    if idx.ndim != 2 or idx.shape[0] != hidden.shape[0]:
        raise ValueError(f"idx must be [N, k] with N = {hidden.shape[0]}, got {idx.shape}")
    width, _ = vocab_blocks(vocab, cfg.block_vocab)
    if idx.shape[1] > width:
        raise ValueError(f"k = {idx.shape[1]} exceeds the block width {width}")
    idx = jnp.where(valid[:, None], jnp.asarray(idx, jnp.int32), 0)
    return _buckets(cfg, hidden, head, idx, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _buckets(cfg: _Config, hidden, head, idx, valid):
    return _buckets_fwd(cfg, hidden, head, idx, valid)[0]


def _block_members(idx, start, width: int):
    """(local column [N, k] clipped into the block, in-block [N, k], membership [N, width])."""
    local = idx - start
    inside = (local >= 0) & (local < width)
    local = jnp.clip(local, 0, width - 1)
    rows = lax.broadcasted_iota(jnp.int32, idx.shape, 0)
    member = jnp.zeros((idx.shape[0], width), bool).at[rows, local].max(inside)
    return local, inside, member


def _bucket_forward(cfg: _Config, hidden, head, idx):
    """(log buckets [N, k + 1], m [N, 1], log Z [N, 1]) in one sweep."""
    rows, vocab = hidden.shape[0], cfg.head.vocab(head)
    width, num_blocks = vocab_blocks(vocab, cfg.block_vocab)
    tau = cfg.temperature

    def step(b, state):
        m, z, z_out, picked = state
        start, new, x, _ = linear_blocks.block_logits(hidden, head, b, width, cfg.head)
        local, inside, member = _block_members(idx, start, width)
        # an overlapped column holds the same logit in both blocks: picking it twice is harmless
        picked = jnp.where(inside, jnp.take_along_axis(x, local, axis=1), picked)
        x = jnp.where(new, x, NEG_INF)
        m_new = jnp.maximum(m, x.max(axis=-1, keepdims=True))
        e = jnp.where(new, jnp.exp((x - m_new) / tau), 0.0)
        scale = jnp.exp(-linear_blocks.shift(m, m_new, tau))
        z = z * scale + e.sum(axis=-1, keepdims=True)
        z_out = z_out * scale + jnp.where(member, 0.0, e).sum(axis=-1, keepdims=True)
        return m_new, z, z_out, picked

    zero = jnp.zeros((rows, 1), jnp.float32)
    init = (jnp.full((rows, 1), NEG_INF, jnp.float32), zero, zero,
            jnp.zeros(idx.shape, jnp.float32))  # fmt: skip
    m, z, z_out, picked = lax.fori_loop(0, num_blocks, step, init)
    log_z = jnp.log(z)
    tail = jnp.where(z_out > 0, jnp.log(jnp.maximum(z_out, 1e-38)) - log_z, -jnp.inf)
    buckets = jnp.concatenate([(picked - m) / tau - log_z, tail], axis=1)
    return buckets, m, log_z


def _buckets_fwd(cfg: _Config, hidden, head, idx, valid):
    buckets, m, log_z = _bucket_forward(cfg, hidden, head, idx)
    buckets = jnp.where(valid[:, None], buckets, 0.0)
    return buckets, (hidden, head, idx, valid, m, log_z, buckets)


def _buckets_bwd(cfg: _Config, saved, ct):
    hidden, head, idx, valid, m, log_z, buckets = saved
    width, _ = vocab_blocks(cfg.head.vocab(head), cfg.block_vocab)
    tau, k = cfg.temperature, idx.shape[1]
    b = jnp.where(valid[:, None], ct.astype(jnp.float32), 0.0)
    b_top, b_tail = b[:, :k], b[:, k:]
    total = b.sum(axis=1, keepdims=True)
    log_tail = buckets[:, k:]
    has_tail = log_tail > NEG_INF

    def block_grad(start, x):
        local, inside, member = _block_members(idx, start, width)
        log_s = (x - m) / tau - log_z
        s = jnp.exp(log_s)
        # s_v b_tail / q for v outside idx (s_v ≤ q there, so the ratio never overflows)
        tail = jnp.where(member | ~has_tail, 0.0, jnp.exp(jnp.minimum(log_s - log_tail, 0.0)))
        g = -s * total + tail * b_tail
        rows = lax.broadcasted_iota(jnp.int32, idx.shape, 0)
        g = g.at[rows, local].add(jnp.where(inside, b_top, 0.0))
        return g / tau

    return (*linear_blocks.backward_sweep(hidden, head, block_grad, cfg.block_vocab, False,
                                          cfg.head), None, None)  # fmt: skip


_buckets.defvjp(_buckets_fwd, _buckets_bwd)


def bucket_divergence(student_logp, teacher_logp, alpha: float) -> jax.Array:
    """Per-row D_α between two bucket distributions given as log-probabilities ``[N, B]``:
    α = 0 KL(p_T ‖ p_S), α = 1 KL(p_S ‖ p_T), between the generalized JSD with the mixture
    α p_T + (1 − α) p_S (jaxpost.opd's convention); 0·log 0 = 0. Differentiable in the student."""
    check_alpha_temperature(alpha, 1.0)
    s, t = student_logp.astype(jnp.float32), lax.stop_gradient(teacher_logp).astype(jnp.float32)

    def kl(log_p, log_q):  # Σ p (log p − log q), with p = 0 terms 0 and their gradient finite
        alive = log_p > NEG_INF
        gap = jnp.where(alive, log_p - jnp.where(alive, log_q, 0.0), 0.0)
        return jnp.where(alive, jnp.exp(jnp.where(alive, log_p, 0.0)) * gap, 0.0).sum(-1)

    if alpha == 0:
        return kl(t, s)
    if alpha == 1:
        return kl(s, t)
    mix = jnp.logaddexp(jnp.log(alpha) + t, jnp.log1p(-alpha) + s)
    return alpha * kl(t, mix) + (1 - alpha) * kl(s, mix)


def topk_from_logits(logits, k: int, *, temperature: float = 1.0) -> TopK:
    """The dense counterpart of `fused_linear_topk` from ``[N, V]`` logits (materialized path
    and tests)."""
    logp = jax.nn.log_softmax(lax.stop_gradient(logits).astype(jnp.float32) / temperature, -1)
    top, idx = lax.top_k(logp, k)
    return TopK(idx.astype(jnp.int32), top, _log_rest(logp, idx))


def bucket_logprobs_from_logits(logits, idx, *, temperature: float = 1.0) -> jax.Array:
    """The dense counterpart of `fused_linear_bucket_logprobs`, differentiable by autodiff."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
    top = jnp.take_along_axis(logp, idx, axis=-1)
    return jnp.concatenate([top, _log_rest(logp, idx)[..., None]], axis=-1)


def _log_rest(logp, idx):
    """log Σ_{v ∉ idx} exp(logp_v), summed over the columns outside idx (no cancellation)."""
    outside = jnp.ones(logp.shape, bool)
    outside = jnp.put_along_axis(outside, idx, False, axis=-1, inplace=False)
    return jax.nn.logsumexp(jnp.where(outside, logp, -jnp.inf), axis=-1)
