"""Float64 NumPy references and a finite-difference check for the loss tests (no tests here).

Written from the formulas, not from jaxpost's code: probabilities are formed in linear space
(jaxpost works with log-probabilities), ranks come from scipy, loops stay loops where that is
clearer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shift = x - np.max(x, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return shift - np.log(np.exp(shift).sum(-1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Σ p log(p / q) over the last axis, 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(-1)


def generalized_jsd(student, teacher, alpha, temperature=1.0):
    p_s = softmax(np.asarray(student, np.float64) / temperature)
    p_t = softmax(np.asarray(teacher, np.float64) / temperature)
    if alpha == 0:
        return kl(p_t, p_s)
    if alpha == 1:
        return kl(p_s, p_t)
    mix = alpha * p_t + (1 - alpha) * p_s
    return alpha * kl(p_t, mix) + (1 - alpha) * kl(p_s, mix)


def entropy(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def masked_mean(x, mask):
    mask = np.asarray(mask, bool)
    return float(x[mask].sum() / max(mask.sum(), 1))


def sft(logits, targets, mask):
    logp = log_softmax(logits)
    nll = np.zeros(targets.shape)
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            nll[b, t] = -logp[b, t, targets[b, t]]
    return masked_mean(nll, mask)


def group_advantages(rewards, group_size, scale, eps=1e-4):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    batch_std = rewards.std(ddof=1) if rewards.size > 1 else 0.0
    for start in range(0, rewards.size, group_size):
        group = rewards[start : start + group_size]
        centered = group - group.mean()
        std = {"group": group.std(ddof=1) if group.size > 1 else 0.0, "batch": batch_std}
        out[start : start + group_size] = (
            centered if scale == "none" else centered / (std[scale] + eps)
        )
    return out


def unlikeliness(rewards, seq_logprobs, group_size, beta_rank):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for start in range(0, rewards.size, group_size):
        sl = slice(start, start + group_size)
        rank = scipy.stats.rankdata(np.asarray(seq_logprobs[sl], np.float64), method="min") - 1
        out[sl] = rewards[sl] * (1 - beta_rank * rank / group_size)
    return out


def is_weight(old, sampling, idx, mode, lo, hi):
    """TRL's vLLM importance-sampling weights of one sequence's valid tokens `idx`."""
    ratio = np.exp(old[idx] - sampling[idx])
    if mode.startswith("sequence"):
        ratio = np.full(idx.size, np.prod(ratio))
    lo = -np.inf if lo is None else lo
    if mode.endswith("truncate"):
        return np.minimum(np.maximum(ratio, lo), hi)
    return np.array([r if lo <= r <= hi else 0.0 for r in ratio])


def grpo(logp, old, adv, mask, *, ref=None, beta=0.0, eps_low=0.2, eps_high=None,
         loss_type="dapo", max_len=None, importance="token", sampling=None,
         is_mode="sequence_mask", is_min=None, is_max=3.0):  # fmt: skip
    """Per-sequence loop over the formulas of grpo_loss's docstring (and, with `sampling`, the
    importance weight multiplying the policy term before the KL term is added)."""
    eps_high = eps_low if eps_high is None else eps_high
    logp, old = np.asarray(logp, np.float64), np.asarray(old, np.float64)
    mask = np.asarray(mask, bool)
    adv = np.asarray(adv, np.float64)
    batch, length = logp.shape
    per_seq_sum, per_seq_count = np.zeros(batch), np.zeros(batch)
    for b in range(batch):
        idx = np.flatnonzero(mask[b])
        a = adv[b] if adv.ndim == 1 else adv[b, idx]
        if importance == "sequence":
            ratio = np.full(
                idx.size, np.exp(np.mean(logp[b, idx] - old[b, idx])) if idx.size else 1
            )
        else:
            ratio = np.exp(logp[b, idx] - old[b, idx])
        loss = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
        if sampling is not None:
            loss = loss * is_weight(old[b], np.asarray(sampling, np.float64)[b], idx, is_mode,
                                    is_min, is_max)  # fmt: skip
        if beta:
            gap = ref[b, idx] - logp[b, idx]
            loss = loss + beta * (np.exp(gap) - gap - 1)
        per_seq_sum[b], per_seq_count[b] = loss.sum(), idx.size
    if loss_type == "grpo":
        return float(np.mean(per_seq_sum / np.maximum(per_seq_count, 1)))
    if loss_type == "dr_grpo":
        return float(per_seq_sum.sum() / (batch * (max_len or length)))
    return float(per_seq_sum.sum() / max(per_seq_count.sum(), 1))


def assert_grad_matches_finite_differences(f, x, *, step=1e-6, rtol=1e-5, atol=1e-8):
    """jax.grad(f)(x) against central differences, coordinate by coordinate, in float64."""
    with jax.enable_x64(True):
        x = jnp.asarray(x, jnp.float64)
        grad = np.asarray(jax.grad(f)(x))
        eye = np.eye(x.size).reshape((x.size, *x.shape)) * step
        f_batched = jax.jit(jax.vmap(f))
        plus = np.asarray(f_batched(x[None] + eye))
        minus = np.asarray(f_batched(x[None] - eye))
    numeric = ((plus - minus) / (2 * step)).reshape(x.shape)
    np.testing.assert_allclose(grad, numeric, rtol=rtol, atol=atol)
