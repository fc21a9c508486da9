"""Float64 NumPy references for the kernels: dense, obvious, slow. Tests compare against these.

The gradient is derived here independently of the kernels' closed forms: first ∂D/∂p_S with
p_S treated as free variables, then the softmax Jacobian, ∂D/∂s_v = p_S,v (g_v − Σ_u p_S,u g_u).
"""

from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _xlogy_ratio(p: np.ndarray, log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """p·(log p − log q) with 0·log 0 = 0."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (log_p - log_q), 0.0)


def _prepare(student_logits, teacher_logits, temperature, mask):
    s = np.asarray(student_logits, np.float64)
    t = np.asarray(teacher_logits, np.float64)
    valid = np.ones(s.shape[0], bool) if mask is None else np.asarray(mask).astype(bool)
    # Masked rows may hold garbage; replace them so they cannot produce NaN.
    s = np.where(valid[:, None], s, 0.0)
    t = np.where(valid[:, None], t, 0.0)
    return _log_softmax(s / temperature), _log_softmax(t / temperature), valid


def _log_mixture(lp_s, lp_t, alpha):
    with np.errstate(divide="ignore"):
        return np.logaddexp(lp_t + np.log(alpha), lp_s + np.log1p(-alpha))


def generalized_jsd(
    student_logits, teacher_logits, *, alpha: float, temperature: float = 1.0, mask=None
) -> np.ndarray:
    """Per-row D_α in float64 (see kernels.jsd); masked rows give 0.

    α = 0: KL(p_T ‖ p_S);  α = 1: KL(p_S ‖ p_T);
    otherwise α·KL(p_T ‖ M) + (1 − α)·KL(p_S ‖ M), M = α p_T + (1 − α) p_S.
    """
    lp_s, lp_t, valid = _prepare(student_logits, teacher_logits, temperature, mask)
    p_s, p_t = np.exp(lp_s), np.exp(lp_t)
    if alpha == 0:
        d = _xlogy_ratio(p_t, lp_t, lp_s).sum(-1)
    elif alpha == 1:
        d = _xlogy_ratio(p_s, lp_s, lp_t).sum(-1)
    else:
        lm = _log_mixture(lp_s, lp_t, alpha)
        d = alpha * _xlogy_ratio(p_t, lp_t, lm).sum(-1) + (1 - alpha) * _xlogy_ratio(
            p_s, lp_s, lm
        ).sum(-1)
    return np.where(valid, d, 0.0)


def generalized_jsd_grad(
    student_logits,
    teacher_logits,
    *,
    alpha: float,
    temperature: float = 1.0,
    mask=None,
    cotangent=None,
) -> np.ndarray:
    """∂(Σ_n cotangent_n · D_n)/∂student_logits in float64, ``[N, V]``; masked rows give 0."""
    lp_s, lp_t, valid = _prepare(student_logits, teacher_logits, temperature, mask)
    p_s, p_t = np.exp(lp_s), np.exp(lp_t)
    with np.errstate(divide="ignore", invalid="ignore"):
        if alpha == 0:
            # D = Σ p_T log p_T − Σ p_T log p_S  ⇒  ∂D/∂p_S = −p_T / p_S
            g = np.where(p_s > 0, -p_t / p_s, 0.0)
        elif alpha == 1:
            # D = Σ p_S (log p_S − log p_T)  ⇒  ∂D/∂p_S = log p_S − log p_T + 1
            g = np.where(p_s > 0, lp_s - lp_t + 1.0, 0.0)
        else:
            # D = α Σ p_T log p_T + (1 − α) Σ p_S log p_S − Σ M log M
            g = np.where(p_s > 0, (1 - alpha) * (lp_s - _log_mixture(lp_s, lp_t, alpha)), 0.0)
    ds = p_s * (g - np.sum(p_s * g, axis=-1, keepdims=True)) / temperature
    ct = np.ones(ds.shape[0]) if cotangent is None else np.asarray(cotangent, np.float64)
    return np.where(valid[:, None], ct[:, None] * ds, 0.0)


def fused_linear_jsd(
    student_hidden,
    student_head,
    teacher_logits,
    *,
    alpha: float,
    temperature: float = 1.0,
    mask=None,
    cotangent=None,
):
    """(D [N], ∂/∂hidden [N, D], ∂/∂head [D, V]) for student logits = hidden @ head, float64.

    Masked rows' hidden states are treated as zeros, as in kernels.fused_linear_jsd.
    """
    h = np.asarray(student_hidden, np.float64)
    w = np.asarray(student_head, np.float64)
    valid = np.ones(h.shape[0], bool) if mask is None else np.asarray(mask).astype(bool)
    h = np.where(valid[:, None], h, 0.0)
    logits = h @ w
    kw = dict(alpha=alpha, temperature=temperature, mask=mask)
    d = generalized_jsd(logits, teacher_logits, **kw)
    g = generalized_jsd_grad(logits, teacher_logits, cotangent=cotangent, **kw)
    return d, g @ w.T, h.T @ g
