"""Importance correction between the distribution a sampler drew from and the policy trained.

A sampler with temperature ≠ 1, top-k or top-p draws y_t from q, a tempered and truncated
version of the policy π_old that produced the rollouts, while GRPO's ratio uses π_old's own
logprobs: the policy gradient is then an expectation under q, biased for π_old. Weighting each
token's policy term by π_old(y_t) / q(y_t) (TRL's vLLM importance-sampling correction) undoes it;
the weight is a constant of the loss (no gradient flows through it), and large weights, where q
put little mass, are truncated or masked:

  "token_truncate"     w_t = clip(π_old(y_t)/q(y_t), is_min, is_max)
  "token_mask"         w_t = π_old(y_t)/q(y_t) where it lies in [is_min, is_max], else 0
  "sequence_truncate"  w_t = clip(Π_t' π_old(y_t')/q(y_t'), is_min, is_max) for every t of a row
  "sequence_mask"      the sequence ratio where it lies in [is_min, is_max], else 0

(is_min None: no lower bound.) With temperature 1 and no truncation q = π_old and every weight
is 1. `losses.grpo_loss(..., sampling_logp=...)` applies it; the loops pass the sampler's
`sample_logprobs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
DEFAULT_MODE, DEFAULT_MAX = "sequence_mask", 3.0  # `losses.grpo_loss`'s defaults (TRL's)


def check(mode: str, is_min: float | None, is_max: float) -> None:
    """ValueError naming the bad setting."""
    if mode not in IS_MODES:
        raise ValueError(f"is_mode must be one of {IS_MODES}, got {mode!r}")
    if not is_max > 0:
        raise ValueError(f"is_max must be > 0, got {is_max}")
    if is_min is not None and not 0 <= is_min < is_max:
        raise ValueError(f"is_min must lie in [0, is_max={is_max}), got {is_min}")


def weights(old_logp_BxL, sampling_logp_BxL, valid_BxL, mode: str, is_min: float | None,
            is_max: float) -> tuple[jax.Array, dict]:  # fmt: skip
    """The per-token weights [B, L] (constants, 0 at invalid tokens) and their statistics:
    `is_ratio_min/mean/max` (the raw ratio over valid tokens, the sequence's ratio on each of its
    tokens in the sequence modes) and `is_corrected_frac` (valid tokens whose weight truncation
    or masking changed)."""
    check(mode, is_min, is_max)
    dtype = old_logp_BxL.dtype
    gap = jnp.where(valid_BxL, old_logp_BxL - sampling_logp_BxL.astype(dtype), 0)
    gap = jax.lax.stop_gradient(gap)
    if mode.startswith("sequence"):
        gap = jnp.broadcast_to(gap.sum(axis=1, keepdims=True), gap.shape)
    ratio = jnp.exp(gap)
    lo = -jnp.inf if is_min is None else is_min
    if mode.endswith("truncate"):
        w = jnp.clip(ratio, lo, is_max)
    else:
        w = jnp.where((ratio >= lo) & (ratio <= is_max), ratio, 0.0)
    w = jnp.where(valid_BxL, w, 0.0)
    count = jnp.maximum(valid_BxL.sum(), 1).astype(dtype)
    aux = {
        "is_ratio_min": jnp.min(jnp.where(valid_BxL, ratio, jnp.inf)),
        "is_ratio_mean": jnp.where(valid_BxL, ratio, 0).sum() / count,
        "is_ratio_max": jnp.max(jnp.where(valid_BxL, ratio, -jnp.inf)),
        "is_corrected_frac": (valid_BxL & (w != ratio)).sum() / count,
    }
    return w, aux
