"""Both KL directions and the teacher's entropy from hidden states, in one vocabulary sweep.

Entropy-aware OPD (jaxpost.opd.entropy_aware_opd_kl) scores each token with

    D = (1 − w)·KL(p_S ‖ p_T) + w·KL(p_T ‖ p_S),   w = H(p_T) / log V   (detached teacher)

Two ``fused_linear_jsd`` calls (α = 1 and α = 0) plus a teacher entropy would sweep the
vocabulary twice forward and twice backward, forming the student's and the teacher's block
logits each time. This op sweeps once each way, like a single ``fused_linear_jsd`` call at a KL
endpoint. Per row, with y = (x − m)/τ under the running raw maxima (kernels.jsd_math), it keeps
the two normalizers Z_S, Z_T and three accumulators

    A_r = Σ e^{y_S}(y_S − y_T),   A_f = Σ e^{y_T}(y_T − y_S),   A_H = Σ e^{y_T} y_T

    KL(p_S ‖ p_T) = A_r/Z_S + log Z_T − log Z_S,   KL(p_T ‖ p_S) = A_f/Z_T + log Z_S − log Z_T,
    H(p_T) = log Z_T − A_H/Z_T.

The backward takes both KLs' cotangents c_r, c_f (for the loss above, 1 − w and w) and writes,
block by block, G = [c_r·p_S(log p_S − log p_T − KL(p_S ‖ p_T)) + c_f·(p_S − p_T)]/τ into ∂h
and ∂W (kernels.linear_blocks). The entropy is a constant for autodiff.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels import jsd_math, linear_blocks
from kernels.config import BlockSizes
from kernels.fused_linear import check_block_sizes, check_inputs, prepare
from kernels.jsd import check_alpha_temperature
from kernels.jsd_math import NEG_INF
from kernels.jsd_xla import vocab_blocks


class KLPair(NamedTuple):
    """Per-row results of ``fused_linear_kl_pair``; each ``[N]`` float32, 0 on masked rows.

    reverse_kl: KL(p_S ‖ p_T) (α = 1 of generalized_jsd), differentiable in the student.
    forward_kl: KL(p_T ‖ p_S) (α = 0), differentiable in the student.
    teacher_entropy: H(p_T) in [0, log V], a constant.
    """

    reverse_kl: jax.Array
    forward_kl: jax.Array
    teacher_entropy: jax.Array


def fused_linear_kl_pair(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    head_layout: str = "DV",
    teacher_head_layout: str = "DV",
    compute_dtype=None,
) -> KLPair:
    """(KL(p_S ‖ p_T), KL(p_T ‖ p_S), H(p_T)) per row, student logits never materialized.

    Arguments are those of ``kernels.fused_linear_jsd`` without alpha and impl: the student as
    hidden ``[N, D]`` and head (``[D, V]``, or ``[V, D]`` with ``head_layout="VD"``), the
    teacher as logits ``[N, V]`` or a pair (hidden, head), p = softmax(logits / τ), an optional
    ``[N]`` row mask (masked rows give 0 and zero gradients whatever they hold), block sizes and
    the per-block matmul ``compute_dtype``.

    Returns:
      ``KLPair(reverse_kl, forward_kl, teacher_entropy)``, each ``[N]`` float32; gradients of
      the two KLs flow to student_hidden and student_head (in its layout and dtype).

    For entropy-aware OPD::

        kl = fused_linear_kl_pair(h, W, (h_T, W_T), mask=m)
        w = kl.teacher_entropy / log(V)
        per_token = (1 - w) * kl.reverse_kl + w * kl.forward_kl

    Raises:
      ValueError: wrong ranks or layouts, mismatched N, D or V, temperature ≤ 0, bad mask.
    """
    teacher, vocab = check_inputs(student_hidden, student_head, teacher, head_layout,
                                  teacher_head_layout)  # fmt: skip
    check_alpha_temperature(1.0, temperature)
    blocks = check_block_sizes(block_sizes)
    dtype = linear_blocks.check_dtype("compute_dtype", compute_dtype)
    specs = (linear_blocks.HeadSpec(head_layout, dtype),
             linear_blocks.HeadSpec(teacher_head_layout, dtype))  # fmt: skip
    static = (float(temperature), blocks.block_vocab, *specs, linear_blocks.poison_enabled())
    hidden, teacher, valid = prepare(student_hidden, teacher, mask)
    rev, fwd, entropy = _pair(static, hidden, student_head, teacher, valid)
    return KLPair(rev, fwd, lax.stop_gradient(entropy))


def _update(state: jsd_math.Online, acc_f, acc_h, s, t, tau: float):
    """Folds one tile of column-masked float32 logits into the normalizers and all three sums.

    ``state.acc`` is A_r, kept exactly as jsd_math.online_update keeps its α = 1 accumulator.
    When the maxima move by Δ_S, Δ_T (units of 1/τ), old terms re-base as
    A_r ← e^{−Δ_S}(A_r + Z_S(Δ_T − Δ_S)), A_f ← e^{−Δ_T}(A_f + Z_T(Δ_S − Δ_T)),
    A_H ← e^{−Δ_T}(A_H − Z_T Δ_T). Written as one pass so the three sums share the tile's
    exponentials. Three separate online updates kept one [N, block] tile more alive on XLA:CPU
    (teacher logits, N = 8192, D = 896: 805.7 MB temp instead of 671.4 MB; 2-core CPU,
    2026-12-02, ``bench_kernels.py --memory --op kl_pair``).
    """
    m_s = jnp.maximum(state.m_s, s.max(axis=-1, keepdims=True))
    m_t = jnp.maximum(state.m_t, t.max(axis=-1, keepdims=True))
    d_s = linear_blocks.shift(state.m_s, m_s, tau)
    d_t = linear_blocks.shift(state.m_t, m_t, tau)
    sup_s, sup_t = s > NEG_INF, t > NEG_INF
    y_s = jnp.where(sup_s, (s - jnp.where(m_s == NEG_INF, 0.0, m_s)) / tau, 0.0)
    y_t = jnp.where(sup_t, (t - jnp.where(m_t == NEG_INF, 0.0, m_t)) / tau, 0.0)
    e_s = jnp.where(sup_s, jnp.exp(y_s), 0.0)
    e_t = jnp.where(sup_t, jnp.exp(y_t), 0.0)
    row_sum = lambda x: x.sum(axis=-1, keepdims=True)
    # Mass of one distribution where the other has none makes that KL +inf, as it should.
    terms_r = jnp.where(sup_s, e_s * (y_s - jnp.where(sup_t, y_t, NEG_INF)), 0.0)
    terms_f = jnp.where(sup_t, e_t * (y_t - jnp.where(sup_s, y_s, NEG_INF)), 0.0)
    acc_r = jnp.exp(-d_s) * (state.acc + state.z_s * (d_t - d_s)) + row_sum(terms_r)
    acc_f = jnp.exp(-d_t) * (acc_f + state.z_t * (d_s - d_t)) + row_sum(terms_f)
    acc_h = jnp.exp(-d_t) * (acc_h - state.z_t * d_t) + row_sum(e_t * y_t)
    z_s = state.z_s * jnp.exp(-d_s) + row_sum(e_s)
    z_t = state.z_t * jnp.exp(-d_t) + row_sum(e_t)
    return jsd_math.Online(m_s, z_s, m_t, z_t, acc_r), acc_f, acc_h


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pair(static, hidden, head, teacher, valid):
    return _fwd(static, hidden, head, teacher, valid)[0]


def _fwd(static, hidden, head, teacher, valid):
    tau, block_vocab, spec, t_spec, _ = static
    rows, vocab = hidden.shape[0], spec.vocab(head)
    width, num_blocks = vocab_blocks(vocab, block_vocab)

    def step(k, carry):
        state, acc_f, acc_h = carry
        start, new, s, _ = linear_blocks.block_logits(hidden, head, k, width, spec)
        t = linear_blocks.teacher_block(teacher, start, width, t_spec)
        s = jsd_math.mask_columns(s, new)  # columns already counted by the previous block
        t = jsd_math.mask_columns(t, new)
        return _update(state, acc_f, acc_h, s, t, tau)

    zero = jnp.zeros((rows, 1), jnp.float32)
    state, acc_f, acc_h = lax.fori_loop(
        0, num_blocks, step, (jsd_math.init_online(rows), zero, zero)
    )
    stats = jsd_math.row_stats(state)
    rev = jsd_math.endpoint_divergence(state, stats, alpha=1.0)
    fwd = jsd_math.endpoint_divergence(state._replace(acc=acc_f), stats, alpha=0.0)
    entropy = jnp.clip(stats.lz_t - acc_h / state.z_t, 0.0, math.log(vocab))
    outputs = tuple(jnp.where(valid, x[:, 0], 0.0) for x in (rev, fwd, entropy))
    return outputs, (hidden, head, teacher, valid, stats, rev)


def _bwd(static, saved, ct):
    tau, block_vocab, spec, t_spec, poison = static
    hidden, head, teacher, valid, stats, rev = saved
    width, _ = vocab_blocks(spec.vocab(head), block_vocab)
    valid_col = valid[:, None]
    coef_r, coef_f = (
        jnp.where(valid, c.astype(jnp.float32), 0.0)[:, None] / tau for c in ct[:2]
    )  # the entropy's cotangent is ignored: it is a constant

    def block_grad(start, s):
        t = linear_blocks.teacher_block(teacher, start, width, t_spec)
        g_r = jsd_math.student_grad(stats, rev, s, t, alpha=1.0, tau=tau)
        g_f = jsd_math.student_grad(stats, None, s, t, alpha=0.0, tau=tau)
        # A row whose reverse KL is +inf (teacher −inf where the student has mass) has a NaN
        # g_r; a loss that gives it zero weight must still get a clean gradient.
        g = jnp.where(coef_r == 0, 0.0, coef_r * g_r) + coef_f * g_f
        return jnp.where(valid_col, g, 0.0)

    d_hidden, d_head = linear_blocks.backward_sweep(
        hidden, head, block_grad, block_vocab, poison, spec
    )
    return d_hidden, d_head, tuple(None for _ in teacher), None


_pair.defvjp(_fwd, _bwd)
