"""On-policy distillation losses: the student's own tokens, scored by a teacher's distribution.

Every loss here has the signature of `opd_kl(alpha)`'s return value,

    (student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL) -> (scalar, aux),

where row b, position t of both logit arrays predicts the same completion token (see
`align_completion` for the OPSD case, where the teacher sees a longer, privileged prompt). The
scalar is the mean over valid positions (mask ≠ 0) of a per-token divergence over the full
vocabulary. The teacher is always wrapped in `stop_gradient`: it is a fixed target.

Divergence convention (TRL's GKD, Liger's JSD): with p_T = softmax(teacher / τ), p_S =
softmax(student / τ) and M = α·p_T + (1 − α)·p_S,

    α = 0:      KL(p_T ‖ p_S)                                (forward KL, mode covering)
    α = 1:      KL(p_S ‖ p_T)                                (reverse KL, mode seeking)
    0 < α < 1:  α·KL(p_T ‖ M) + (1 − α)·KL(p_S ‖ M)          (generalized JSD)

The endpoints are the *normalized* limits of the interior: D_α ≈ α·KL(p_T ‖ p_S) as α → 0 and
D_α ≈ (1 − α)·KL(p_S ‖ p_T) as α → 1, so the scale jumps at α = 0 and α = 1 (as in GKD). No τ²
factor is applied (also GKD's convention); scale the loss yourself for Hinton-style gradients.

Numerics: logits may hold −inf (vocabulary entries masked out by both models). Every p·log p
term is evaluated with "double where" guards, so 0·log 0 = 0 in the value *and* the gradient.
The divergence is +inf only where it truly is: a distribution that puts mass where the other
has none (e.g. reverse KL when the student can emit a token the teacher forbids). Positions with
mask = 0 are replaced by zeros before any arithmetic, so garbage there (even inf or NaN) changes
neither the loss nor the gradient, and the gradient at those positions is exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

OPDLoss = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, Any]]]


# ---------------------------------------------------------------------------------------------
# shared helpers


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs; float64 stays float64 (finite-difference tests)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _masked_mean(x_BxL: jax.Array, mask_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ mask·x / max(Σ mask, 1), Σ mask); the where keeps inf/NaN at padding out of the sum."""
    valid = mask_BxL.astype(bool)
    count = valid.sum().astype(x_BxL.dtype)
    total = jnp.where(valid, x_BxL, 0).sum()
    return total / jnp.maximum(count, 1), count


def _check_pair(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, mask_BxL: jax.Array) -> None:
    if student_BxLxV.ndim != 3 or teacher_BxLxV.ndim != 3:
        raise ValueError(
            f"expected logits [B, L, V]; got student {student_BxLxV.shape}, "
            f"teacher {teacher_BxLxV.shape}"
        )
    if student_BxLxV.shape[-1] != teacher_BxLxV.shape[-1]:
        raise ValueError(
            f"teacher and student vocabularies differ (teacher V={teacher_BxLxV.shape[-1]}, "
            f"student V={student_BxLxV.shape[-1]}); token-level distillation needs one vocabulary"
        )
    if student_BxLxV.shape != teacher_BxLxV.shape:
        raise ValueError(
            f"student logits {student_BxLxV.shape} and teacher logits {teacher_BxLxV.shape} must "
            "cover the same [B, L] positions (see align_completion for OPSD)"
        )
    if mask_BxL.shape != student_BxLxV.shape[:2]:
        raise ValueError(f"mask {mask_BxL.shape} must be [B, L] = {student_BxLxV.shape[:2]}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _prepare(student_BxLxV, teacher_BxLxV, mask_BxL):
    """Both logits in the compute dtype with masked positions zeroed; the teacher detached."""
    dtype = _compute_dtype(student_BxLxV)
    valid_BxLx1 = mask_BxL.astype(bool)[:, :, None]
    student = jnp.where(valid_BxLx1, student_BxLxV.astype(dtype), 0)
    teacher = jnp.where(valid_BxLx1, jax.lax.stop_gradient(teacher_BxLxV).astype(dtype), 0)
    return student, teacher


def _kl_from_logprobs(logp_a: jax.Array, logp_b: jax.Array) -> jax.Array:
    """KL(a ‖ b) over the last axis with 0·log 0 = 0, "double where" guarded: the helper of the
    one dense D_α (`kernels.jsd.kl_from_logprobs`), reused by the entropy-aware variant."""
    from kernels import jsd

    return jsd.kl_from_logprobs(logp_a, logp_b)


def _entropy_from_logprobs(logp: jax.Array) -> jax.Array:
    """H = −Σ_v p_v log p_v over the last axis, with 0·log 0 = 0."""
    support = logp > -jnp.inf
    safe = jnp.where(support, logp, 0)
    return -jnp.where(support, jnp.exp(safe) * safe, 0).sum(-1)


# ---------------------------------------------------------------------------------------------
# the generalized JSD and its loss


def generalized_jsd(
    student_logits: jax.Array, teacher_logits: jax.Array, *, alpha: float, temperature: float = 1.0
) -> jax.Array:
    """Per-position generalized JSD over the last (vocabulary) axis, dense `jnp`.

    D_α(p_T, p_S) = α·KL(p_T ‖ M) + (1 − α)·KL(p_S ‖ M),  M = α·p_T + (1 − α)·p_S,
    with the limits D_0 = KL(p_T ‖ p_S) and D_1 = KL(p_S ‖ p_T) (see the module docstring).
    This is `kernels.generalized_jsd_reference`, the code base's one dense implementation:
    any leading dims, −inf guarded, gradients into both arguments (callers detach the teacher).

    Returns:
      divergences with the logits' shape minus the last axis, in float32 (float64 for f64 input).
    """
    # Imported here, as in `_kernel_divergence`: jaxpost.opd imports without the kernels package.
    from kernels import jsd

    _check_alpha(alpha)
    _check_temperature(temperature)
    return jsd.generalized_jsd_reference(
        student_logits, teacher_logits, alpha=alpha, temperature=temperature
    )


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a Python float in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {alpha}")


def opd_kl(alpha: float, *, temperature: float = 1.0, impl: str | None = None) -> OPDLoss:
    """The on-policy distillation loss with divergence D_α (module docstring), as a function.

        loss = Σ_{b,t} mask_bt · D_α(p_T(·|b,t), p_S(·|b,t)) / max(Σ mask, 1)

    Args:
      alpha: 0 forward KL(p_T ‖ p_S), 1 reverse KL(p_S ‖ p_T), between: generalized JSD.
      temperature: both logits are divided by it before the softmax.
      impl: None computes the dense `jnp` reference here (materializes a few [B, L, V] arrays).
        Any other string is passed to `kernels.generalized_jsd(..., impl=impl)` (one of
        `kernels.IMPLS`), the fused implementation that never holds [N, V] probabilities.
        The logits are passed as they are (zeroing padded rows would cost the [N, V] copy the
        kernel exists to avoid): the kernel's `mask` must keep padded rows out of its backward.

    Returns:
      `loss_fn(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL) -> (loss, aux)`, aux with
      `num_tokens` and `divergence_max` (the largest per-token divergence among valid tokens).

    Raises:
      ValueError: alpha outside [0, 1] or temperature ≤ 0 (here); at call time, vocabularies
        or [B, L] shapes that differ.
    """
    _check_alpha(alpha)
    _check_temperature(temperature)
    if impl is not None and not isinstance(impl, str):
        raise ValueError(f"impl must be None or a kernels implementation name, got {impl!r}")
    alpha = float(alpha)

    def loss_fn(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL):
        _check_pair(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL)
        if impl is None:
            student, teacher = _prepare(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL)
            div_BxL = generalized_jsd(student, teacher, alpha=alpha, temperature=temperature)
        else:
            div_BxL = _kernel_divergence(
                student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, alpha, temperature, impl
            )
        loss, count = _masked_mean(div_BxL, mask_BxL)
        valid = mask_BxL.astype(bool)
        aux = {
            "num_tokens": count,
            "divergence_max": jnp.max(jnp.where(valid, div_BxL, 0), initial=0.0),
        }
        return loss, aux

    return loss_fn


def _kernel_divergence(student_BxLxV, teacher_BxLxV, mask_BxL, alpha, temperature, impl):
    # Imported here: `kernels` is an optional sibling package and jaxpost must import without it.
    import kernels

    b, l, v = student_BxLxV.shape

    def divergence(student_NxV, teacher_NxV, mask_N):
        return kernels.generalized_jsd(student_NxV, teacher_NxV, alpha=alpha,
                                       temperature=temperature, mask=mask_N, impl=impl,
                                       interpret=_interpret_pallas(impl))  # fmt: skip

    mesh = jax.sharding.get_abstract_mesh()
    if impl.startswith("pallas") and not mesh.empty and mesh.size > 1:
        if mesh.explicit_axes:
            raise ValueError(
                f"the Pallas OPD kernels run per device under a mesh with Auto axes (jaxpost's "
                f"`sharding.make_mesh`); this mesh has Explicit axes {mesh.explicit_axes}"
            )
        if not mesh.are_all_axes_manual:  # inside a caller's shard_map nothing is left to split
            divergence = _rowwise_shard_map(divergence, mesh, b * l)
    div_N = divergence(
        student_BxLxV.reshape(b * l, v),
        jax.lax.stop_gradient(teacher_BxLxV).reshape(b * l, v),
        mask_BxL.reshape(b * l),
    )
    return div_N.reshape(b, l)


def _interpret_pallas(impl: str) -> bool:
    """Whether a Pallas OPD loss runs in the Pallas interpreter: jaxpost's choice is yes on a
    CPU, where no Pallas kernel compiles (so tests and CPU runs still exercise the kernel's own
    code), and compiled everywhere else (a kernel foreign to the backend is then a clear error).
    The kernels leave this choice to their caller."""
    return impl.startswith("pallas") and jax.default_backend() == "cpu"


def _rowwise_shard_map(divergence, mesh, rows: int):
    """Run a Pallas divergence on each device's own rows, under `jax.shard_map`.

    A Pallas kernel is an opaque custom call: XLA's SPMD partitioner cannot split it, and a
    Mosaic (TPU) kernel in a multi-device program is an error unless every mesh axis is manual.
    Rows are independent, so each device takes a contiguous block of rows: the mesh axes (those
    not already manual, when called inside a caller's shard_map) are used in order (data, fsdp,
    tensor) while their product divides `rows` (the batch axes always do: loops refuse a batch
    that does not split over them); an axis left out holds the same rows on each of its devices. The vocabulary is whole inside a shard: where the logits were
    split by vocabulary (tensor > 1) they are gathered first, so each device holds
    [rows / shards, V] logits, the layout of the model's own logits without tensor parallelism.
    """
    free = [name for name in mesh.axis_names if name not in mesh.manual_axes]
    axes, size = [], 1
    for name in free:
        if mesh.shape[name] > 1 and rows % (size * mesh.shape[name]) == 0:
            axes.append(name)
            size *= mesh.shape[name]
    split = tuple(axes) or None
    return jax.shard_map(divergence, mesh=mesh, in_specs=(P(split, None), P(split, None), P(split)),
                         out_specs=P(split), axis_names=frozenset(free), check_vma=False)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# variants


def entropy_aware_opd_kl(*, temperature: float = 1.0, threshold: float | None = None) -> OPDLoss:
    """Reverse KL, shifted towards forward KL where the teacher is uncertain.

    Per token, with the teacher's normalized entropy h = H(p_T) / log V ∈ [0, 1],

        w = h                      (threshold=None: a soft, hyperparameter-free weight)
        w = 1[h > threshold]       (threshold given: a hard switch)
        D = (1 − w)·KL(p_S ‖ p_T) + w·KL(p_T ‖ p_S)

    This follows the idea of Jin et al., "Entropy-Aware On-Policy Distillation of Language
    Models" (2026): reverse KL is mode-seeking, which collapses diversity and gives noisy
    gradients where the teacher spreads its mass over several good continuations; forward KL
    covers those modes. The exact weighting is our choice, stated here: dividing by log V makes
    the weight comparable across vocabularies, the soft form needs no threshold to tune, and a
    convex mix keeps the loss on the KL scale (w → 0 everywhere recovers standard OPD). The
    weight depends only on the detached teacher, so it is a constant for the gradient.

    aux: `num_tokens`, `teacher_entropy` and `forward_weight` (means over valid tokens).
    """
    _check_temperature(temperature)
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a normalized entropy in [0, 1], got {threshold}")

    def loss_fn(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL):
        _check_pair(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL)
        student, teacher = _prepare(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL)
        logp_s = jax.nn.log_softmax(student / temperature, axis=-1)
        logp_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
        entropy_BxL = _entropy_from_logprobs(logp_t)
        vocab = student_logits_BxLxV.shape[-1]
        h_BxL = entropy_BxL / jnp.log(vocab) if vocab > 1 else jnp.zeros_like(entropy_BxL)
        if threshold is None:
            w_BxL = jnp.clip(h_BxL, 0.0, 1.0)
        else:
            w_BxL = (h_BxL > threshold).astype(h_BxL.dtype)
        div_BxL = (1 - w_BxL) * _kl_from_logprobs(logp_s, logp_t) + w_BxL * _kl_from_logprobs(
            logp_t, logp_s
        )
        loss, count = _masked_mean(div_BxL, mask_BxL)
        aux = {
            "num_tokens": count,
            "teacher_entropy": _masked_mean(entropy_BxL, mask_BxL)[0],
            "forward_weight": _masked_mean(w_BxL, mask_BxL)[0],
        }
        return loss, aux

    return loss_fn


def prefix_mask(completion_mask_BxL: jax.Array, prefix_len: int) -> jax.Array:
    """Keep only the first `prefix_len` valid completion tokens of each row.

    prefix_mask[b, t] = mask[b, t] ∧ (Σ_{s ≤ t} mask[b, s] ≤ prefix_len), so it also works for
    masks with holes. Returns the input's dtype.
    """
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be ≥ 0, got {prefix_len}")
    valid = completion_mask_BxL.astype(bool)
    seen_BxL = jnp.cumsum(valid.astype(jnp.int32), axis=1)
    return (valid & (seen_BxL <= prefix_len)).astype(completion_mask_BxL.dtype)


def prefix_opd(loss_fn: OPDLoss, prefix_len: int) -> OPDLoss:
    """Prefix OPD: `loss_fn` restricted to the first `prefix_len` tokens of each completion.

    The early tokens of a reasoning trace carry most of the teacher's signal about *how* to
    start, and scoring only them cuts the teacher's cost; the normalizer is the number of
    prefix tokens, not of completion tokens.
    """
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be ≥ 0, got {prefix_len}")

    def prefixed(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL):
        return loss_fn(
            student_logits_BxLxV, teacher_logits_BxLxV, prefix_mask(mask_BxL, prefix_len)
        )

    return prefixed


def reverse_kl_token_advantages(
    student_logp_BxL: jax.Array, teacher_logp_BxL: jax.Array, mask_BxL: jax.Array
) -> jax.Array:
    """Per-token advantages from the sampled-token reverse KL (detached, 0 at padding).

        A_bt = −(log p_S(y_bt) − log p_T(y_bt)) = log p_T(y_bt) − log p_S(y_bt)

    For y ~ p_S, E[log p_S(y) − log p_T(y)] = KL(p_S ‖ p_T), so a policy gradient with these
    per-token rewards (no discounting, no baseline) follows the sampled estimate of the reverse
    KL's gradient: one teacher logprob per token instead of its full distribution. Feed them to
    `losses.grpo_loss`, which accepts [B, L] advantages, with `old_logp` = `student_logp_BxL`.
    Use the untempered logprobs of both models (`losses.token_logprobs`).
    """
    if student_logp_BxL.shape != teacher_logp_BxL.shape or mask_BxL.shape != student_logp_BxL.shape:
        raise ValueError(
            f"student {student_logp_BxL.shape}, teacher {teacher_logp_BxL.shape} and mask "
            f"{mask_BxL.shape} logprobs must all be [B, L]"
        )
    valid = mask_BxL.astype(bool)
    advantage = jnp.where(valid, teacher_logp_BxL - student_logp_BxL, 0)
    return jax.lax.stop_gradient(advantage)


def align_completion(
    logits_BxLxV: jax.Array, completion_start_B: jax.Array, completion_len: int
) -> jax.Array:
    """The logits that predict each completion token, gathered from a longer sequence.

    In OPSD the teacher sees (privileged prompt + completion) and the student (prompt +
    completion): the same completion starts at different slots. With completion token j at slot
    s_b + j (s_b = `completion_start_B[b]`), the logits predicting it sit at slot s_b + j − 1, so

        out[b, j] = logits[b, s_b − 1 + j],  j = 0 .. C − 1   (C = completion_len)

    Apply it to both views and the results align position by position. Requires s_b ≥ 1 and
    s_b − 1 + C ≤ L (a prompt precedes every completion); checked when `completion_start_B` is
    concrete; under jit an out-of-range index is clamped by the gather, so validate on the host.
    """
    b, l, _ = logits_BxLxV.shape
    if completion_start_B.shape != (b,):
        raise ValueError(f"completion_start_B {completion_start_B.shape} must be [B] = ({b},)")
    if not isinstance(completion_start_B, jax.core.Tracer):
        starts = jax.device_get(completion_start_B)
        if (starts < 1).any() or (starts - 1 + completion_len > l).any():
            raise ValueError(
                f"completion starts {starts.tolist()} with length {completion_len} do not fit "
                f"in sequences of length {l} (need 1 ≤ start and start − 1 + C ≤ L)"
            )
    index_BxC = completion_start_B[:, None] - 1 + jnp.arange(completion_len)[None, :]
    return jnp.take_along_axis(logits_BxLxV, index_BxC[:, :, None], axis=1)


__all__ = [
    "OPDLoss",
    "align_completion",
    "entropy_aware_opd_kl",
    "generalized_jsd",
    "opd_kl",
    "prefix_mask",
    "prefix_opd",
    "reverse_kl_token_advantages",
]
