"""On-policy distillation losses: the student's own tokens, scored by a teacher's distribution.

Every loss here is an `OPDLossSpec`, a small frozen description (kind, α, τ, threshold, prefix,
kernel) with two faces that give the same value, gradient and aux:

    spec(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL) -> (scalar, aux)
    spec.from_hidden(student_hidden_BxLxD, student_head, teacher_hidden_BxLxDt, teacher_head,
                     mask_BxL, head_layout=..., ...) -> (scalar, aux)

The first takes materialized logits; the second takes the final hidden states and LM heads and
never forms [B, L, V] logits, of either model (`kernels.fused_linear_*`, via
`jaxpost.opd_divergence`): the form `train.opd_objective(..., loss_impl="fused_linear")` calls.
Row b, position t of both sides predicts the same completion token (see `align_completion` for
OPSD, where the teacher sees a longer, privileged prompt). The scalar is the mean over valid
positions (mask ≠ 0) of a per-token divergence over the full vocabulary. The teacher is always
wrapped in `stop_gradient`: it is a fixed target.

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

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxpost import opd_divergence

OPDLoss = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict[str, Any]]]
KINDS = ("kl", "entropy_aware")


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
    from kernels import jsd  # imported here: jaxpost.opd imports without the kernels package

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


@dataclasses.dataclass(frozen=True)
class OPDLossSpec:
    """An OPD loss as data: callable on logits, and on hidden states via `from_hidden`.

    Build it with `opd_kl`, `entropy_aware_opd_kl` and `prefix_opd` (which check the values and
    document the formulas); it is hashable, so it can be a static argument.

    Attributes:
      kind: "kl" (D_α of the module docstring) or "entropy_aware" (`entropy_aware_opd_kl`).
      alpha: α of D_α (kind "kl"); 0 forward KL, 1 reverse KL.
      temperature: both models' logits are divided by it before the softmax.
      threshold: entropy-aware only: None for the soft weight, else the hard switch's level.
      prefix_len: None, or count only the first `prefix_len` valid tokens of each row.
      impl: kind "kl" on logits: None for the dense `jnp` formula, or a `kernels.IMPLS` name
        for `kernels.generalized_jsd(impl=...)`. `from_hidden` ignores it (its ops are the
        fused-linear ones).
    """

    kind: str = "kl"
    alpha: float = 1.0
    temperature: float = 1.0
    threshold: float | None = None
    prefix_len: int | None = None
    impl: str | None = None

    def __post_init__(self):
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        _check_alpha(self.alpha)
        _check_temperature(self.temperature)
        object.__setattr__(self, "alpha", float(self.alpha))
        t, n = self.threshold, self.prefix_len
        need(t is None or self.kind == "entropy_aware", "threshold is for entropy_aware only")
        need(t is None or 0.0 <= t <= 1.0, f"threshold is a normalized entropy in [0, 1], got {t}")
        need(n is None or (isinstance(n, int) and n >= 0), f"prefix_len must be ≥ 0, got {n}")
        need(self.impl is None or isinstance(self.impl, str),
             f"impl must be None or a kernels implementation name, got {self.impl!r}")  # fmt: skip
        need(self.impl is None or self.kind == "kl", "entropy-aware OPD has no kernel over "
             "materialized logits; its fused form is from_hidden (loss_impl='fused_linear')")  # fmt: skip

    def on_kernel(self, impl: str) -> OPDLossSpec:
        """This loss with D_α computed by `kernels.generalized_jsd(impl=impl)` on logits.

        Entropy-aware losses have no such kernel and are returned unchanged (dense formula).
        """
        return dataclasses.replace(self, impl=impl) if self.kind == "kl" else self

    def _mask(self, mask_BxL: jax.Array) -> jax.Array:
        return mask_BxL if self.prefix_len is None else prefix_mask(mask_BxL, self.prefix_len)

    def __call__(self, student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL):
        """(loss, aux) from both models' logits [B, L, V] (the module docstring's first face)."""
        opd_divergence.check_logits(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL)
        mask_BxL = self._mask(mask_BxL)
        if self.kind == "kl":
            if self.impl is None:
                student, teacher = _prepare(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL)
                div_BxL = generalized_jsd(student, teacher, alpha=self.alpha,
                                          temperature=self.temperature)  # fmt: skip
            else:
                div_BxL = opd_divergence.materialized_divergence(
                    student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL, self.alpha,
                    self.temperature, self.impl,
                )  # fmt: skip
            return _kl_loss(div_BxL, mask_BxL)
        student, teacher = _prepare(student_logits_BxLxV, teacher_logits_BxLxV, mask_BxL)
        pair = opd_divergence.dense_kl_pair(student, teacher, self.temperature)
        return self._entropy_aware(*pair, student_logits_BxLxV.shape[-1], mask_BxL)

    def from_hidden(self, student_hidden_BxLxD, student_head, teacher_hidden_BxLxDt,
                    teacher_head, mask_BxL, *, head_layout: str = "DV",
                    teacher_head_layout: str = "DV", compute_dtype=None, block_sizes=None):  # fmt: skip
        """(loss, aux) from hidden states and heads, never forming [B, L, V] logits.

        The logits this loss sees are student_hidden @ student_head and teacher_hidden @
        teacher_head (float32 accumulation, operands in `compute_dtype`). Heads are [D, V]
        ("DV") or a tied model's [V, D] embedding table as stored ("VD"). Same value, gradient
        (to the student's hidden states and head) and aux as calling the spec on those logits.
        """
        mask_BxL = self._mask(mask_BxL)
        kind = "kl" if self.kind == "kl" else "pair"
        out = opd_divergence.hidden_divergence(
            kind, student_hidden_BxLxD, student_head, teacher_hidden_BxLxDt, teacher_head,
            mask_BxL, alpha=self.alpha, temperature=self.temperature, head_layout=head_layout,
            teacher_head_layout=teacher_head_layout, compute_dtype=compute_dtype,
            block_sizes=block_sizes,
        )  # fmt: skip
        if kind == "kl":
            return _kl_loss(out.divergence, mask_BxL)
        vocab = student_head.shape[1 if head_layout == "DV" else 0]
        return self._entropy_aware(out.divergence, out.forward_kl, out.teacher_entropy, vocab,
                                   mask_BxL)  # fmt: skip

    def _entropy_aware(self, reverse_BxL, forward_BxL, entropy_BxL, vocab: int, mask_BxL):
        """The mix of `entropy_aware_opd_kl` from per-token KLs and the teacher's entropy."""
        entropy_BxL = jax.lax.stop_gradient(entropy_BxL)
        h_BxL = entropy_BxL / jnp.log(vocab) if vocab > 1 else jnp.zeros_like(entropy_BxL)
        if self.threshold is None:
            w_BxL = jnp.clip(h_BxL, 0.0, 1.0)
        else:
            w_BxL = (h_BxL > self.threshold).astype(h_BxL.dtype)
        div_BxL = (1 - w_BxL) * reverse_BxL + w_BxL * forward_BxL
        loss, count = _masked_mean(div_BxL, mask_BxL)
        aux = {
            "num_tokens": count,
            "teacher_entropy": _masked_mean(entropy_BxL, mask_BxL)[0],
            "forward_weight": _masked_mean(w_BxL, mask_BxL)[0],
        }
        return loss, aux


def _kl_loss(div_BxL: jax.Array, mask_BxL: jax.Array):
    loss, count = _masked_mean(div_BxL, mask_BxL)
    valid = mask_BxL.astype(bool)
    aux = {
        "num_tokens": count,
        "divergence_max": jnp.max(jnp.where(valid, div_BxL, 0), initial=0.0),
    }
    return loss, aux


def opd_kl(alpha: float, *, temperature: float = 1.0, impl: str | None = None) -> OPDLossSpec:
    """The on-policy distillation loss with divergence D_α (module docstring).

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
      an `OPDLossSpec`, callable as `loss_fn(student_logits_BxLxV, teacher_logits_BxLxV,
      mask_BxL) -> (loss, aux)` (and with `.from_hidden`), aux with `num_tokens` and
      `divergence_max` (the largest per-token divergence among valid tokens).

    Raises:
      ValueError: alpha outside [0, 1] or temperature ≤ 0 (here); at call time, vocabularies
        or [B, L] shapes that differ.
    """
    return OPDLossSpec("kl", alpha=alpha, temperature=temperature, impl=impl)


# ---------------------------------------------------------------------------------------------
# variants


def entropy_aware_opd_kl(*, temperature: float = 1.0,
                         threshold: float | None = None) -> OPDLossSpec:  # fmt: skip
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
    weight depends only on the detached teacher, so it is a constant for the gradient. From
    hidden states both KLs and the entropy come from one sweep (`kernels.fused_linear_kl_pair`).

    aux: `num_tokens`, `teacher_entropy` and `forward_weight` (means over valid tokens).
    """
    return OPDLossSpec("entropy_aware", temperature=temperature, threshold=threshold)


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
    prefix tokens, not of completion tokens. An `OPDLossSpec` comes back as a spec (prefixes
    compose: the shorter one wins), so it keeps its hidden-state form; any other function of
    logits is wrapped.
    """
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be ≥ 0, got {prefix_len}")
    if isinstance(loss_fn, OPDLossSpec):
        keep = prefix_len if loss_fn.prefix_len is None else min(prefix_len, loss_fn.prefix_len)
        return dataclasses.replace(loss_fn, prefix_len=keep)

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
    "KINDS",
    "OPDLoss",
    "OPDLossSpec",
    "align_completion",
    "entropy_aware_opd_kl",
    "generalized_jsd",
    "opd_kl",
    "prefix_mask",
    "prefix_opd",
    "reverse_kl_token_advantages",
]
