"""α-DPG: distributional policy gradient toward the base filtered by the verifier.

"Whatever Remains Must Be True" (2512.05962; code naver/alpha-dpg, built on f-DPG, Go et al.
2023) trains π_θ toward the target p(y) ∝ a(y)·b(y): a the frozen base's sequence probability,
b the verifier's reward (0/1), by minimising Amari's α-divergence D_α(π_θ ‖ p). α → 1 is the
reverse KL (mode-seeking, GRPO-like), α = 0 the forward KL (mass-covering, plain DPG). On
on-policy samples y_i ~ π_θ its gradient is REINFORCE on the pseudo-reward

    R(y) = (a(y)·b(y) / (Ẑ·π_θ(y)))^(1-α) - 1        (clipped above at `clip`; b = 0 → R = -1)

with Ẑ, the target's partition function per prompt, estimated by importance sampling over the
prompt's own group: Ẑ = mean_i a(y_i)·b(y_i)/π_θ(y_i), clamped to ≤ 1 (a group without a
verified sample gets `z_empty`, which makes every R = -1 and the group's gradient zero), and a
leave-one-out baseline within the group: A_i = R_i - mean_{j≠i} R_j.

As in the released code, R is (1-α) times the divergence's -f'(t) (the factor is a learning-rate
scale), Ẑ is re-estimated on each step's batch, and R is clipped from above only. Ours: the loss
that takes these advantages is GRPO's surrogate (`losses.grpo_loss`), whose gradient at one
update per batch is the same REINFORCE direction, averaged per token instead of the paper's
sum over tokens / a constant; π_θ(y) is the sampler's untempered policy logprob, so the arm is
exact at temperature 1 (its default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CLIP = 10.0  # the released code's pseudo_reward_clip
DEFAULT_Z_EMPTY = 1e-4  # its z_default: Ẑ of a group without a verified sample


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha-DPG's alpha must lie in [0, 1) (0: forward KL, toward 1: "
                         f"reverse KL), got {alpha}")  # fmt: skip


def pseudo_rewards(policy_logp_N, base_logp_N, rewards_N, group_size: int, *, alpha: float,
                   clip: float = DEFAULT_CLIP, z_empty: float = DEFAULT_Z_EMPTY):  # fmt: skip
    """(R [N], log Ẑ per row [N]) from sequence logprobs under the policy and the base and the
    verifier's rewards b ≥ 0 (rows of one prompt contiguous, `group_size` each)."""
    check_alpha(alpha)
    pol, base = jnp.asarray(policy_logp_N), jnp.asarray(base_logp_N)
    dt = jnp.result_type(pol.dtype, jnp.float32)
    b = jnp.asarray(rewards_N, dt)
    ok = b > 0
    log_w = jnp.where(ok, base.astype(dt) + jnp.log(jnp.where(ok, b, 1)) - pol.astype(dt), -jnp.inf)
    groups = log_w.reshape(-1, group_size)
    log_z = jax.nn.logsumexp(groups, axis=1) - jnp.log(group_size)
    log_z = jnp.where(jnp.isfinite(log_z), jnp.minimum(log_z, 0.0), jnp.log(z_empty).astype(dt))
    log_z = jnp.repeat(log_z, group_size)
    r = jnp.where(ok, jnp.expm1((1 - alpha) * jnp.where(ok, log_w - log_z, 0.0)), -1.0)
    return jnp.minimum(r, clip), log_z


def leave_one_out(values_N, group_size: int):
    """A_i = v_i - mean of the other values of its group (0 for a group of one)."""
    v = jnp.asarray(values_N).reshape(-1, group_size)
    if group_size == 1:
        return jnp.zeros(v.size, v.dtype)
    others = (v.sum(1, keepdims=True) - v) / (group_size - 1)
    return (v - others).reshape(-1)


def advantages(policy_logp_N, base_logp_N, rewards_N, group_size: int, *, alpha: float,
               clip: float = DEFAULT_CLIP) -> tuple[np.ndarray, dict]:  # fmt: skip
    """α-DPG's per-sequence advantages and metrics (mean log Ẑ, mean R, the clipped share)."""
    r, log_z = pseudo_rewards(policy_logp_N, base_logp_N, rewards_N, group_size, alpha=alpha,
                              clip=clip)  # fmt: skip
    adv = np.asarray(leave_one_out(r, group_size), np.float32)
    r = np.asarray(r)
    return adv, {"dpg_log_z": float(np.mean(np.asarray(log_z))),
                 "dpg_pseudo_reward": float(r.mean()), "dpg_clipped_frac": float(np.mean(r >= clip))}
