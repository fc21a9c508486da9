"""Blockwise math of the teacher–student divergence, shared by every implementation.

Every function here acts on one tile of logits, ``[R, C]`` (R rows, C vocabulary entries), and
on per-row state of shape ``[R, 1]``, so the same code runs inside a Pallas TPU kernel (on VMEM
tiles), a Pallas GPU kernel (on register tiles) and the blockwise XLA loop. All arithmetic is
float32 (or wider) regardless of the input dtype.

Notation, per row: x_S, x_T the raw student and teacher logits, τ the temperature,
m = max_v x_v (raw), Z = Σ_v exp((x_v − m)/τ), log p_v = (x_v − m)/τ − log Z.

Working with the raw maximum m and subtracting it *before* dividing by τ matters for logits of
large magnitude: around ±1e4 a float32 division x/τ is off by ~1e-3, while x − m is exact for
entries within a factor two of the maximum (Sterbenz) — the ones that carry probability mass.

Gradients (s = x_S/τ; the caller multiplies by the row cotangent and by 1/τ):

    α = 0:      ∂D/∂s_v = p_S,v − p_T,v
    α = 1:      ∂D/∂s_v = p_S,v (log p_S,v − log p_T,v − D)
    0 < α < 1:  ∂D/∂s_v = (1 − α) p_S,v (log p_S,v − log M_v − KL(p_S ‖ M))

The interior form follows from D = α Σ p_T log p_T + (1 − α) Σ p_S log p_S − Σ M log M, whose
derivative in p_S,v is (1 − α)(log p_S,v − log M_v); the softmax Jacobian then subtracts the
p_S-weighted mean of that, which is (1 − α)·KL(p_S ‖ M). So the backward needs, per row, the
two normalizers and one scalar ``c`` (D itself for α = 1, KL(p_S ‖ M) for the interior).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

NEG_INF = float("-inf")


class Online(NamedTuple):
    """Running state of one sweep over the vocabulary, every field ``[R, 1]`` float32.

    m_s, m_t: running raw maxima (−inf until a finite entry is seen).
    z_s, z_t: Σ exp((x − m)/τ) under the current maxima.
    acc: for the KL endpoints, Σ_v exp(y_w,v)·(y_w,v − y_o,v) with y = (x − m)/τ, where w is the
      distribution that weighs the KL (teacher for α = 0, student for α = 1) and o the other one;
      unused (zero) in the interior.
    """

    m_s: object
    z_s: object
    m_t: object
    z_t: object
    acc: object


class RowStats(NamedTuple):
    """Per-row normalizers saved for the backward pass, every field ``[R, 1]`` float32."""

    m_s: object  # raw student maximum (0 where the row has no finite entry)
    lz_s: object  # log Σ exp((x_S − m_s)/τ)
    m_t: object
    lz_t: object


def is_endpoint(alpha: float) -> bool:
    """α = 0 and α = 1 are plain KLs, computable in one online sweep; the interior needs two."""
    return alpha == 0.0 or alpha == 1.0


def init_online(rows: int) -> Online:
    neg = jnp.full((rows, 1), NEG_INF, jnp.float32)
    zero = jnp.zeros((rows, 1), jnp.float32)
    return Online(neg, zero, neg, zero, zero)


def _safe_max(m):
    # A running maximum of −inf means nothing has been accumulated; shifting by 0 instead keeps
    # (x − m) free of inf − inf.
    return jnp.where(m == NEG_INF, 0.0, m)


def _shift(m_old, m_new, tau: float):
    """(m_new − m_old)/τ ≥ 0, or 0 while nothing was accumulated under m_old."""
    return jnp.where(m_old == NEG_INF, 0.0, (m_new - m_old) / tau)


def mask_columns(x, col_valid):
    """Columns outside the vocabulary (padding of the last block) become −inf: zero mass in both."""
    return jnp.where(col_valid, x.astype(jnp.float32), NEG_INF)


def online_update(state: Online, s, t, *, alpha: float, tau: float) -> Online:
    """Folds one tile of (already column-masked, float32) logits into the running state.

    The KL accumulator is kept in shifted units and re-based when a maximum moves: if the maxima
    move by Δw, Δo (in units of 1/τ), every old term exp(y_w)(y_w − y_o) becomes
    exp(−Δw)·exp(y_w)(y_w − y_o − Δw + Δo), so acc ← exp(−Δw)·(acc + z_w·(Δo − Δw)).
    """
    m_s = jnp.maximum(state.m_s, s.max(axis=-1, keepdims=True))
    m_t = jnp.maximum(state.m_t, t.max(axis=-1, keepdims=True))
    d_s = _shift(state.m_s, m_s, tau)
    d_t = _shift(state.m_t, m_t, tau)
    sup_s = s > NEG_INF
    sup_t = t > NEG_INF
    y_s = jnp.where(sup_s, (s - _safe_max(m_s)) / tau, 0.0)
    y_t = jnp.where(sup_t, (t - _safe_max(m_t)) / tau, 0.0)
    e_s = jnp.where(sup_s, jnp.exp(y_s), 0.0)
    e_t = jnp.where(sup_t, jnp.exp(y_t), 0.0)
    z_s = state.z_s * jnp.exp(-d_s) + e_s.sum(axis=-1, keepdims=True)
    z_t = state.z_t * jnp.exp(-d_t) + e_t.sum(axis=-1, keepdims=True)
    acc = state.acc
    if is_endpoint(alpha):
        if alpha == 0.0:  # KL(p_T ‖ p_S): the teacher weighs
            z_w_old, d_w, d_o, sup_w, sup_o, e_w, y_w, y_o = (
                state.z_t,
                d_t,
                d_s,
                sup_t,
                sup_s,
                e_t,
                y_t,
                y_s,
            )
        else:  # KL(p_S ‖ p_T)
            z_w_old, d_w, d_o, sup_w, sup_o, e_w, y_w, y_o = (
                state.z_s,
                d_s,
                d_t,
                sup_s,
                sup_t,
                e_s,
                y_s,
                y_t,
            )
        # Mass of w where o has none makes the KL +inf, as it should.
        y_o = jnp.where(sup_o, y_o, NEG_INF)
        terms = jnp.where(sup_w, e_w * (y_w - y_o), 0.0)
        acc = jnp.exp(-d_w) * (acc + z_w_old * (d_o - d_w)) + terms.sum(axis=-1, keepdims=True)
    return Online(m_s, z_s, m_t, z_t, acc)


def row_stats(state: Online) -> RowStats:
    return RowStats(
        _safe_max(state.m_s), jnp.log(state.z_s), _safe_max(state.m_t), jnp.log(state.z_t)
    )


def endpoint_divergence(state: Online, stats: RowStats, *, alpha: float):
    """KL from the one-sweep accumulator: Σ p_w (log p_w − log p_o) = acc/z_w + log z_o − log z_w."""
    if alpha == 0.0:
        return state.acc / state.z_t + stats.lz_s - stats.lz_t
    return state.acc / state.z_s + stats.lz_t - stats.lz_s


def _log_probs(x, m, lz, tau: float):
    sup = x > NEG_INF
    return jnp.where(sup, (x - m) / tau - lz, NEG_INF), sup


def _log_mixture(lp_s, sup_s, lp_t, sup_t, alpha: float):
    """log M = log(α p_T + (1 − α) p_S), −inf where both are zero, without inf − inf."""
    a = jnp.where(sup_t, lp_t + math.log(alpha), NEG_INF)
    b = jnp.where(sup_s, lp_s + math.log1p(-alpha), NEG_INF)
    hi = jnp.maximum(a, b)
    hi_safe = jnp.where(hi == NEG_INF, 0.0, hi)
    return jnp.where(
        sup_s | sup_t, hi_safe + jnp.log1p(jnp.exp(jnp.minimum(a, b) - hi_safe)), NEG_INF
    )


def mixture_terms(stats: RowStats, s, t, *, alpha: float, tau: float):
    """Row sums of one tile's share of D = α·KL(p_T ‖ M) + (1 − α)·KL(p_S ‖ M) and of KL(p_S ‖ M).

    Returns ``(d, c)``, each ``[R, 1]``; summing them over the tiles gives D and the backward's c.
    """
    lp_s, sup_s = _log_probs(s, stats.m_s, stats.lz_s, tau)
    lp_t, sup_t = _log_probs(t, stats.m_t, stats.lz_t, tau)
    log_m = _log_mixture(lp_s, sup_s, lp_t, sup_t, alpha)
    # An entry with p = 0 contributes 0·log 0 = 0: select before multiplying.
    kl_t = jnp.where(sup_t, jnp.exp(jnp.where(sup_t, lp_t, 0.0)) * (lp_t - log_m), 0.0)
    kl_s = jnp.where(sup_s, jnp.exp(jnp.where(sup_s, lp_s, 0.0)) * (lp_s - log_m), 0.0)
    kl_t = kl_t.sum(axis=-1, keepdims=True)
    kl_s = kl_s.sum(axis=-1, keepdims=True)
    return alpha * kl_t + (1.0 - alpha) * kl_s, kl_s


def student_grad(stats: RowStats, c, s, t, *, alpha: float, tau: float):
    """∂D/∂s on one tile (s = x_S/τ), float32 ``[R, C]``; see the module docstring.

    Entries where the student has no mass get exactly 0 (for every α, p_S,v is a factor).
    """
    lp_s, sup_s = _log_probs(s, stats.m_s, stats.lz_s, tau)
    p_s = jnp.where(sup_s, jnp.exp(jnp.where(sup_s, lp_s, 0.0)), 0.0)
    lp_t, sup_t = _log_probs(t, stats.m_t, stats.lz_t, tau)
    if alpha == 0.0:
        p_t = jnp.where(sup_t, jnp.exp(jnp.where(sup_t, lp_t, 0.0)), 0.0)
        return p_s - p_t
    if alpha == 1.0:
        return jnp.where(sup_s, p_s * (lp_s - lp_t - c), 0.0)
    log_m = _log_mixture(lp_s, sup_s, lp_t, sup_t, alpha)
    return jnp.where(sup_s, (1.0 - alpha) * p_s * (lp_s - log_m - c), 0.0)
