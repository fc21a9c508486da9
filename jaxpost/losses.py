"""Losses for the three paradigms, as pure functions of arrays returning `(scalar, aux)`.

  * SFT:  `sft_loss` (token NLL over a mask), `sft_loss_from_logprobs`, `token_logprobs`.
  * RL:   `group_advantages`, `unlikeliness_rewards`, `grpo_loss` (GRPO / DAPO / Dr. GRPO
          aggregation, GSPO's sequence-level ratio, k3 KL to a reference).
  * OPD:  `opd_kl(alpha)` and its variants, defined in `jaxpost.opd` and re-exported here.

Shape letters: B batch (sequences), L positions, V vocabulary, N rows = groups · G, G group size.
Masks are nonzero on valid tokens. A padded position contributes neither to a loss nor to its
gradient: values there are selected away with `where` before any arithmetic, so even inf or NaN
padding cannot leak into the result.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.importance import DEFAULT_MAX, DEFAULT_MODE
from jaxpost.importance import weights as is_weights
from jaxpost.opd import (
    OPDLoss,
    OPDLossSpec,
    align_completion,
    entropy_aware_opd_kl,
    generalized_jsd,
    opd_kl,
    prefix_mask,
    prefix_opd,
    reverse_kl_token_advantages,
)

Aux = dict[str, Any]

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs; float64 stays float64 (finite-difference tests)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _masked_sum_count(x_BxL: jax.Array, valid_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.where(valid_BxL, x_BxL, 0).sum(), valid_BxL.sum().astype(x_BxL.dtype)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------------------------------------
# supervised


def token_logprobs(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """log softmax(logits / τ)[target] at every position: [B, L], float32 (float64 for f64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets_BxL.shape != logits_BxLxV.shape[:-1]:
        raise ValueError(f"targets {targets_BxL.shape} must be logits' leading shape")
    logits = logits_BxLxV.astype(_compute_dtype(logits_BxLxV)) / temperature
    logp_BxLxV = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def sft_loss(
    logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array
) -> tuple[jax.Array, Aux]:
    """Mean negative log-likelihood of the targets over the valid tokens.

        loss = −Σ_{b,t} m_bt · log softmax(logits_bt)[y_bt] / max(Σ m, 1)

    `logits[:, t]` must already predict `targets[:, t]` (shift before calling). Completion-only
    training is a mask that is zero on the prompt.

    aux: `num_tokens`, `nll_sum` (for exact aggregation across micro-batches) and `accuracy`
    (argmax = target, over valid tokens).
    """
    if logits_BxLxV.ndim != 3 or mask_BxL.shape != logits_BxLxV.shape[:2]:
        raise ValueError(f"expected logits [B, L, V] and mask [B, L]; got {logits_BxLxV.shape}, "
                         f"{mask_BxL.shape}")  # fmt: skip
    valid_BxL = mask_BxL.astype(bool)
    # Zero the padded rows first: their logits may be anything, and a row of −inf would make
    # log_softmax NaN there, which a later `where` hides from the value but not the gradient.
    logits = jnp.where(valid_BxL[:, :, None], logits_BxLxV, 0)
    correct_BxL = jnp.argmax(logits, axis=-1) == targets_BxL
    return sft_loss_from_logprobs(token_logprobs(logits, targets_BxL), mask_BxL, correct_BxL)


def sft_loss_from_logprobs(
    logp_BxL: jax.Array, mask_BxL: jax.Array, correct_BxL: jax.Array | None = None
) -> tuple[jax.Array, Aux]:
    """`sft_loss` from the targets' log-probabilities (e.g. `kernels.fused_linear_logprobs`,
    which never forms the logits): −Σ m·logp / max(Σ m, 1), the same aux; `accuracy` needs
    `correct_BxL` (argmax = target), and is left out without it."""
    if logp_BxL.shape != mask_BxL.shape:
        raise ValueError(f"logp {logp_BxL.shape} and mask {mask_BxL.shape} must match")
    valid_BxL = mask_BxL.astype(bool)
    nll_sum, count = _masked_sum_count(-logp_BxL, valid_BxL)
    denom = jnp.maximum(count, 1)
    aux = {"num_tokens": count, "nll_sum": nll_sum}
    if correct_BxL is not None:
        correct_sum, _ = _masked_sum_count(correct_BxL.astype(logp_BxL.dtype), valid_BxL)
        aux["accuracy"] = correct_sum / denom
    return nll_sum / denom, aux


# ---------------------------------------------------------------------------------------------
# rewards and advantages


def _check_rewards(rewards_N: jax.Array, group_size: int) -> None:
    if rewards_N.ndim != 1:
        raise ValueError(f"rewards must be [N], got shape {rewards_N.shape}")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards_N.shape[0] % group_size:
        raise ValueError(
            f"batch of {rewards_N.shape[0]} rewards is not divisible by group_size={group_size}"
        )
    # Concrete rewards are checked here; traced ones cannot be without a host callback, so
    # under jit the trainer validates rewards on the host before building the batch (a NaN
    # reward would otherwise make every advantage of its group NaN and the step be skipped).
    if _is_concrete(rewards_N):
        finite_N = np.isfinite(np.asarray(jax.device_get(rewards_N)))
        if not finite_N.all():
            bad = np.flatnonzero(~finite_N).tolist()
            raise ValueError(f"non-finite rewards at rows {bad[:10]} (of {len(bad)})")


def group_advantages(
    rewards_N: jax.Array, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> tuple[jax.Array, Aux]:
    """Group-relative advantages, as in GRPO (and TRL's `scale_rewards`).

    Rows i·G .. i·G + G − 1 are the G samples of prompt i. With μ_i the group mean,

        A_n = (r_n − μ_group(n)) / (σ + eps)

    where σ is the standard deviation with Bessel's correction (ddof = 1) of the row's group
    (`scale="group"`), of the whole batch (`"batch"`, the mean is still per group), or σ = 0 and
    no division (`"none"`, Dr. GRPO). A group of equal rewards gives zeros, never NaN. With
    group_size 1 a row is its own baseline, so every advantage is 0 (there is no signal without
    peers); a sample std of one value is undefined and taken as 0.

    Returns:
      (advantages [N] in the rewards' float dtype, aux) with aux `reward_mean`, `reward_std`
      (batch, ddof = 1) and `frac_zero_std_groups` (groups whose rewards are all equal).

    Raises:
      ValueError: unknown scale, eps ≤ 0, N not divisible by group_size, or non-finite rewards
        (the last only for concrete inputs; see `_check_rewards`).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if scale != "none" and not eps > 0:
        raise ValueError(f"eps must be > 0 so that equal rewards give 0, not NaN; got {eps}")
    _check_rewards(rewards_N, group_size)
    n = rewards_N.shape[0]
    rewards = rewards_N.astype(_compute_dtype(rewards_N))
    rewards_GxK = rewards.reshape(n // group_size, group_size)  # one row per prompt
    mean_Gx1 = rewards_GxK.mean(axis=1, keepdims=True)
    centered_GxK = rewards_GxK - mean_Gx1
    group_std_Gx1 = _sample_std(rewards_GxK, axis=1)
    batch_std = _sample_std(rewards, axis=0)[0]
    if scale == "group":
        advantages_GxK = centered_GxK / (group_std_Gx1 + eps)
    elif scale == "batch":
        advantages_GxK = centered_GxK / (batch_std + eps)
    else:
        advantages_GxK = centered_GxK
    aux = {
        "reward_mean": rewards.mean(),
        "reward_std": batch_std,
        "frac_zero_std_groups": (group_std_Gx1 == 0).astype(rewards.dtype).mean(),
    }
    return advantages_GxK.reshape(n), aux


def _sample_std(x: jax.Array, axis: int) -> jax.Array:
    """Standard deviation with ddof = 1 along `axis` (kept); 0 where there is a single value."""
    count = x.shape[axis]
    if count < 2:
        return jnp.zeros_like(x.mean(axis=axis, keepdims=True))
    centered = x - x.mean(axis=axis, keepdims=True)
    return jnp.sqrt((centered**2).sum(axis=axis, keepdims=True) / (count - 1))


def unlikeliness_rewards(
    rewards_N: jax.Array, seq_logprobs_N: jax.Array, group_size: int, *, beta_rank: float = 0.25
) -> jax.Array:
    """He, Fried & Welleck's unlikeliness reward ("Rewarding the Unlikely", 2025).

        r'_n = r_n · (1 − β_rank · rank_n / G)

    rank_n ∈ {0, …, G − 1} orders the G samples of a group by sequence logprob, ascending: the
    least likely sample has rank 0 and keeps its full reward, likelier ones are discounted, so
    GRPO stops favouring the correct solutions the policy already finds most often. Ties share
    the lowest rank of their block (rank_n = #{m in group : logp_m < logp_n}), so identical
    completions get identical rewards whatever their order. Zero rewards stay zero.
    """
    if seq_logprobs_N.shape != rewards_N.shape:
        raise ValueError(
            f"seq_logprobs {seq_logprobs_N.shape} must match rewards {rewards_N.shape}"
        )
    if not 0.0 <= beta_rank <= 1.0:
        raise ValueError(f"beta_rank must lie in [0, 1] to keep rewards' sign, got {beta_rank}")
    _check_rewards(rewards_N, group_size)
    n = rewards_N.shape[0]
    logp_GxK = seq_logprobs_N.reshape(n // group_size, group_size)
    # [groups, K, K]: entry (i, a, b) says sample b of group i is less likely than sample a.
    less_GxKxK = logp_GxK[:, None, :] < logp_GxK[:, :, None]
    rank_N = less_GxKxK.sum(axis=-1).reshape(n)
    rewards = rewards_N.astype(_compute_dtype(rewards_N))
    return rewards * (1 - beta_rank * rank_N.astype(rewards.dtype) / group_size)


# ---------------------------------------------------------------------------------------------
# policy gradient


def grpo_loss(
    logp_BxL: jax.Array,
    old_logp_BxL: jax.Array,
    advantages_B: jax.Array,
    mask_BxL: jax.Array,
    *,
    ref_logp: jax.Array | None = None,
    kl_beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "dapo",
    max_len: int | None = None,
    importance: str = "token",
    sampling_logp: jax.Array | None = None,
    is_mode: str = DEFAULT_MODE,
    is_min: float | None = None,
    is_max: float = DEFAULT_MAX,
) -> tuple[jax.Array, Aux]:
    """Clipped policy-gradient loss of GRPO and its descendants.

    Per valid token, with ratio r = exp(log π(y_t) − log π_old(y_t)) and advantage A,

        ℓ_t = −min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A) + β·k3_t,
        k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1       (unbiased, ≥ 0, KL(π‖π_ref))

    aggregated by `loss_type` (TRL's definitions; m the mask):
        "grpo":          (1/B) Σ_b [Σ_t m_bt ℓ_bt / max(Σ_t m_bt, 1)]
        "bnpo", "dapo":  Σ_bt m_bt ℓ_bt / max(Σ_bt m_bt, 1)
        "dr_grpo":       Σ_bt m_bt ℓ_bt / (B · max_len),  max_len defaults to L
    ("dapo" and "bnpo" coincide here; they differ in TRL only in how a token count is gathered
    across processes, which a global-batch jit program does not need.)

    importance="sequence" is GSPO (Zheng et al., 2025): every token of sequence b uses
    s_b = exp(Σ_t m_bt (logp − old_logp) / |y_b|). It is written as
    log r_bt = logp_bt − sg(logp_bt) + sg(log s_b), which has value log s_b and whose gradient,
    summed over the tokens of b, is exactly ∇s_b's: GSPO's gradient under every loss_type when
    advantages are per sequence, and GSPO-token's when they are per token.

    Args:
      logp_BxL: log π(y_t) under the policy being optimized (differentiated).
      old_logp_BxL: under the sampling policy (treated as constant).
      advantages_B: [B] per sequence, or [B, L] per token (e.g. `reverse_kl_token_advantages`).
      mask_BxL: nonzero on completion tokens.
      ref_logp: [B, L] reference-policy logprobs, needed when kl_beta > 0.
      kl_beta: weight β of the KL penalty (0 disables it; ref_logp then only feeds aux["kl"]).
      eps_low, eps_high: clip range [1 − eps_low, 1 + eps_high]; eps_high=None means eps_low.
        DAPO's clip-higher is e.g. eps_low=0.2, eps_high=0.28; GSPO uses ~3e-4 / 4e-4.
      loss_type, max_len, importance: see above.
      sampling_logp: [B, L] log q(y_t) under the distribution the sampler drew from (tempered,
        truncated); each token's policy term (not the KL term) is then multiplied by the
        importance weight of `jaxpost.importance` (`is_mode`, truncated or masked outside
        [is_min, is_max], TRL's semantics). None: no correction.

    Returns:
      (loss, aux) with `policy_loss` (without the KL term), `kl` (mean k3 over valid tokens, 0
      without ref_logp), `clip_frac_low` (r < 1 − eps_low with A < 0: the lower clip is active),
      `clip_frac_high` (r > 1 + eps_high with A > 0), `ratio_mean`, `num_tokens`; with
      `sampling_logp`, the weights' `is_ratio_min/mean/max` and `is_corrected_frac`.
    """
    eps_high = eps_low if eps_high is None else eps_high
    _check_grpo_args(logp_BxL, old_logp_BxL, advantages_B, mask_BxL, ref_logp, kl_beta,
                     eps_low, eps_high, loss_type, max_len, importance, sampling_logp)  # fmt: skip
    b, l = logp_BxL.shape
    dtype = _compute_dtype(logp_BxL)
    valid_BxL = mask_BxL.astype(bool)
    logp = jnp.where(valid_BxL, logp_BxL.astype(dtype), 0)
    old_logp = jax.lax.stop_gradient(jnp.where(valid_BxL, old_logp_BxL.astype(dtype), 0))
    adv = jax.lax.stop_gradient(advantages_B.astype(dtype))
    adv_BxL = jnp.broadcast_to(adv[:, None], (b, l)) if adv.ndim == 1 else adv

    log_ratio_BxL = logp - old_logp
    if importance == "sequence":
        lengths_Bx1 = jnp.maximum(valid_BxL.sum(axis=1, keepdims=True), 1).astype(dtype)
        log_s_Bx1 = log_ratio_BxL.sum(axis=1, keepdims=True) / lengths_Bx1
        log_ratio_BxL = logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(log_s_Bx1)
    ratio_BxL = jnp.exp(jnp.where(valid_BxL, log_ratio_BxL, 0))
    clipped_BxL = jnp.clip(ratio_BxL, 1 - eps_low, 1 + eps_high)
    policy_BxL = -jnp.minimum(ratio_BxL * adv_BxL, clipped_BxL * adv_BxL)
    is_aux = {}
    if sampling_logp is not None:
        w_BxL, is_aux = is_weights(old_logp, sampling_logp, valid_BxL, is_mode, is_min, is_max)
        policy_BxL = policy_BxL * w_BxL

    if ref_logp is not None:
        ref_gap_BxL = jnp.where(valid_BxL, jax.lax.stop_gradient(ref_logp).astype(dtype) - logp, 0)
        kl_BxL = jnp.exp(ref_gap_BxL) - ref_gap_BxL - 1
    else:
        kl_BxL = jnp.zeros_like(policy_BxL)
    token_loss_BxL = policy_BxL + kl_beta * kl_BxL if kl_beta else policy_BxL

    aggregate = _aggregator(loss_type, valid_BxL, max_len or l)
    count = jnp.maximum(valid_BxL.sum(), 1)
    frac = lambda x: _masked_sum_count(x.astype(dtype), valid_BxL)[0] / count  # noqa: E731
    aux = {
        "policy_loss": aggregate(policy_BxL),
        "kl": frac(kl_BxL),
        "clip_frac_low": frac((ratio_BxL < 1 - eps_low) & (adv_BxL < 0)),
        "clip_frac_high": frac((ratio_BxL > 1 + eps_high) & (adv_BxL > 0)),
        "ratio_mean": frac(ratio_BxL),
        "num_tokens": valid_BxL.sum().astype(dtype),
        **is_aux,
    }
    return aggregate(token_loss_BxL), jax.tree.map(jax.lax.stop_gradient, aux)


def _aggregator(loss_type: str, valid_BxL: jax.Array, max_len: int):
    b = valid_BxL.shape[0]

    def aggregate(x_BxL: jax.Array) -> jax.Array:
        masked_BxL = jnp.where(valid_BxL, x_BxL, 0)
        if loss_type == "grpo":
            lengths_B = jnp.maximum(valid_BxL.sum(axis=1), 1).astype(x_BxL.dtype)
            return (masked_BxL.sum(axis=1) / lengths_B).mean()
        if loss_type == "dr_grpo":
            return masked_BxL.sum() / (b * max_len)
        return masked_BxL.sum() / jnp.maximum(valid_BxL.sum(), 1).astype(x_BxL.dtype)

    return aggregate


def _check_grpo_args(logp, old_logp, advantages, mask, ref_logp, kl_beta, eps_low, eps_high,
                     loss_type, max_len, importance, sampling_logp=None):  # fmt: skip
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance must be one of {IMPORTANCE_LEVELS}, got {importance!r}")
    if not 0.0 <= eps_low <= 1.0:
        raise ValueError(f"eps_low must lie in [0, 1] (lower clip 1 − eps_low ≥ 0), got {eps_low}")
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be ≥ 0, got {eps_high}")
    if not kl_beta >= 0.0:
        raise ValueError(f"kl_beta must be ≥ 0, got {kl_beta}")
    if kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs ref_logp (reference-policy token logprobs)")
    if logp.ndim != 2:
        raise ValueError(f"logp must be [B, L], got {logp.shape}")
    for name, x in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp),
                    ("sampling_logp", sampling_logp)):
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} {x.shape} must match logp {logp.shape}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"advantages {advantages.shape} must be [B] or [B, L] for {logp.shape}")
    if max_len is not None:
        if loss_type != "dr_grpo":
            raise ValueError(f"max_len only applies to loss_type='dr_grpo', not {loss_type!r}")
        if max_len < logp.shape[1]:
            raise ValueError(f"max_len={max_len} is shorter than the completions ({logp.shape})")


__all__ = [
    "ADVANTAGE_SCALES",
    "IMPORTANCE_LEVELS",
    "LOSS_TYPES",
    "OPDLoss",
    "OPDLossSpec",
    "align_completion",
    "entropy_aware_opd_kl",
    "generalized_jsd",
    "group_advantages",
    "grpo_loss",
    "opd_kl",
    "prefix_mask",
    "prefix_opd",
    "reverse_kl_token_advantages",
    "sft_loss",
    "sft_loss_from_logprobs",
    "token_logprobs",
    "unlikeliness_rewards",
]
