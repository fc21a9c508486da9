"""Float64 NumPy references for the fused-linear ops beyond fused_linear_jsd (kernels.reference).

Dense and obvious: logits = h @ W in float64, then the textbook formulas. The gradients are the
chain rule written out, ∂/∂h = G Wᵀ and ∂/∂W = hᵀ G from the logit gradient G, with G derived
independently of the kernels' blockwise forms. Masked rows' hidden states count as zeros.
"""

from __future__ import annotations

import numpy as np

from kernels import reference


def _rows(hidden, head, mask):
    h = np.asarray(hidden, np.float64)
    w = np.asarray(head, np.float64)
    valid = np.ones(h.shape[0], bool) if mask is None else np.asarray(mask).astype(bool)
    return np.where(valid[:, None], h, 0.0), w, valid


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def token_logprobs(hidden, head, targets, *, temperature: float = 1.0, mask=None,
                   cotangent=None, entropy_cotangent=None) -> dict:  # fmt: skip
    """log softmax(hW/τ)[y] per row and its gradients, float64; masked rows give 0.

    Returns a dict: ``logp``, ``entropy`` (H of softmax(hW/τ)), ``is_argmax`` (first argmax of
    hW equals y), ``d_hidden`` and ``d_head`` of Σ_n cotangent_n · logp_n (+ Σ_n
    entropy_cotangent_n · H_n when given).
    """
    h, w, valid = _rows(hidden, head, mask)
    y = np.asarray(targets)
    logits = h @ w
    lp = _log_softmax(logits / temperature)
    p = np.exp(lp)
    rows = np.arange(h.shape[0])
    logp = np.where(valid, lp[rows, np.clip(y, 0, w.shape[1] - 1)], 0.0)
    entropy = np.where(valid, -(p * lp).sum(-1), 0.0)
    is_argmax = valid & (logits.argmax(-1) == y)
    # ∂ log p_y / ∂x_v = (1[v = y] − p_v)/τ
    onehot = np.zeros_like(p)
    onehot[rows[valid], y[valid]] = 1.0
    ct = np.ones(h.shape[0]) if cotangent is None else np.asarray(cotangent, np.float64)
    g = np.where(valid[:, None], ct[:, None] * (onehot - p) / temperature, 0.0)
    if entropy_cotangent is not None:
        # H = −Σ p log p;  ∂H/∂x_v = −p_v (log p_v + H)/τ
        ct_h = np.asarray(entropy_cotangent, np.float64)[:, None]
        d_h = -p * (lp + entropy[:, None]) / temperature
        g = g + np.where(valid[:, None], ct_h * d_h, 0.0)
    return dict(logp=logp, entropy=entropy, is_argmax=is_argmax, d_hidden=g @ w.T, d_head=h.T @ g)


def kl_pair(student_hidden, student_head, teacher_logits, *, temperature: float = 1.0, mask=None,
            cotangents=(None, None)) -> dict:  # fmt: skip
    """KL(p_S‖p_T), KL(p_T‖p_S), H(p_T) per row and the gradients of c_r·rev + c_f·fwd, float64.

    Returns a dict: ``reverse_kl``, ``forward_kl``, ``teacher_entropy``, ``d_hidden``,
    ``d_head``. The KLs and their logit gradients come from kernels.reference.
    """
    h, w, valid = _rows(student_hidden, student_head, mask)
    logits = h @ w
    t = np.where(valid[:, None], np.asarray(teacher_logits, np.float64), 0.0)
    kw = dict(temperature=temperature, mask=mask)
    rev = reference.generalized_jsd(logits, t, alpha=1.0, **kw)
    fwd = reference.generalized_jsd(logits, t, alpha=0.0, **kw)
    g = reference.generalized_jsd_grad(logits, t, alpha=1.0, cotangent=cotangents[0], **kw)
    g = g + reference.generalized_jsd_grad(logits, t, alpha=0.0, cotangent=cotangents[1], **kw)
    lp_t = _log_softmax(t / temperature)
    with np.errstate(invalid="ignore"):
        p_log_p = np.where(lp_t > -np.inf, np.exp(lp_t) * lp_t, 0.0)  # 0·log 0 = 0
    entropy = np.where(valid, -p_log_p.sum(-1), 0.0)
    return dict(reverse_kl=rev, forward_kl=fwd, teacher_entropy=entropy, d_hidden=g @ w.T,
                d_head=h.T @ g)  # fmt: skip
