"""Fused teacher–student divergence over the vocabulary: public wrapper, custom VJP, dispatch.

For logits x_S, x_T ``[N, V]`` and temperature τ, with p = softmax(x/τ) per row and
M = α·p_T + (1 − α)·p_S (the convention of TRL's GKD and Liger's JSD):

    α = 0:      D = KL(p_T ‖ p_S)                          (forward KL)
    α = 1:      D = KL(p_S ‖ p_T)                          (reverse KL)
    0 < α < 1:  D = α·KL(p_T ‖ M) + (1 − α)·KL(p_S ‖ M)    (generalized JSD)

No implementation writes a softmax to memory. A sweep over vocabulary blocks keeps online
maxima and sums for both distributions (and, at the KL endpoints, the KL itself, re-based as
the maxima move), so α ∈ {0, 1} takes one read of the logits; the interior reads them twice,
since log M needs both normalizers. The backward reads them once more and writes
∂D/∂x_S block by block from five saved numbers per row (kernels.jsd_math has the formulas).

Conventions: the teacher is stop-gradient. An entry of −inf in both logits has zero mass in
both distributions and contributes 0·log 0 = 0. Rows with mask = 0 give exactly 0 and a zero
gradient whatever they hold (inf and NaN included). V need not be a multiple of the block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels import jsd_xla
from kernels.config import DEFAULT_BLOCK_SIZES, IMPLS, BlockSizes, Static

_POISON = False


def set_poison_outputs(enabled: bool) -> None:
    """Test hook: NaN-fill every kernel output buffer before the kernel writes it."""
    global _POISON
    _POISON = bool(enabled)


def default_impl(backend: str | None = None) -> str:
    """The fastest implementation for a backend (default: ``jax.default_backend()``)."""
    backend = jax.default_backend() if backend is None else backend
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend, "xla")


def _implementation(impl: str):
    if impl == "xla":
        return jsd_xla
    if impl == "pallas_tpu":
        from kernels import jsd_pallas_tpu

        return jsd_pallas_tpu
    from kernels import jsd_pallas_gpu

    return jsd_pallas_gpu


def check_alpha_temperature(alpha, temperature) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"alpha must be a Python float in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {alpha}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a Python float > 0, got {temperature!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def resolve_impl(impl: str | None) -> str:
    if impl is None:
        return default_impl()
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS} or None")
    return impl


def row_mask(mask, rows: int) -> jax.Array:
    """``mask`` ([N] bool or 0/1 numbers, or None) as an [N] bool array."""
    if mask is None:
        return jnp.ones((rows,), bool)
    mask = jnp.asarray(mask)
    if mask.shape != (rows,):
        raise ValueError(f"mask must have shape [N] = ({rows},), got {mask.shape}")
    return mask.astype(bool)


def _check_logits(student_logits, teacher_logits) -> None:
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be [N, V], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(
            f"vocabulary mismatch: student V={student_logits.shape[1]}, teacher "
            f"V={teacher_logits.shape[1]}; token-level distillation needs one vocabulary"
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"row mismatch: student logits {student_logits.shape} vs teacher logits "
            f"{teacher_logits.shape}; both must score the same N positions"
        )


def generalized_jsd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    alpha: float,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    impl: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Per-row divergence D_α(p_T, p_S) over the vocabulary (module docstring), fused.

    Args:
      student_logits: ``[N, V]`` float32 or bfloat16; the only differentiable input.
      teacher_logits: ``[N, V]``, same N and V; treated as a constant (stop-gradient).
      alpha: 0 forward KL, 1 reverse KL, between the generalized JSD (a Python float).
      temperature: both logits are divided by it. No τ² factor is applied.
      mask: optional ``[N]`` bool or 0/1; rows with 0 give 0 and a zero gradient.
      impl: one of ``IMPLS``, or None for the best on ``jax.default_backend()``. On CPU the
        Pallas implementations run in interpret mode.
      block_sizes: tile sizes; None takes ``DEFAULT_BLOCK_SIZES[impl]``.

    Returns:
      ``[N]`` float32 divergences.

    Raises:
      ValueError: wrong ranks, mismatched N or V, non-float logits, a mask that is not [N],
        alpha outside [0, 1], temperature ≤ 0, an unknown impl or unusable block sizes.
    """
    _check_logits(student_logits, teacher_logits)
    check_alpha_temperature(alpha, temperature)
    impl = resolve_impl(impl)
    blocks = DEFAULT_BLOCK_SIZES[impl] if block_sizes is None else block_sizes
    if not isinstance(blocks, BlockSizes):
        raise ValueError(f"block_sizes must be a kernels.BlockSizes, got {blocks!r}")
    blocks.check_for(impl)
    valid = row_mask(mask, student_logits.shape[0])
    cfg = Static(
        alpha=float(alpha),
        temperature=float(temperature),
        impl=impl,
        blocks=blocks,
        interpret=jax.default_backend() == "cpu",
        poison=_POISON,
    )
    return _generalized_jsd(cfg, student_logits, jax.lax.stop_gradient(teacher_logits), valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _generalized_jsd(cfg: Static, student, teacher, valid):
    return _fwd(cfg, student, teacher, valid)[0]


def _fwd(cfg: Static, student, teacher, valid):
    # Rows are independent in every implementation, so garbage in a masked row stays in that
    # row's statistics; selecting (not multiplying) keeps NaN out of the result.
    div, residual = _implementation(cfg.impl).forward(student, teacher, cfg)
    div = jnp.where(valid, div, 0.0)
    return div, (student, teacher, valid, residual)


def _bwd(cfg: Static, saved, ct):
    student, teacher, valid, residual = saved
    coef = jnp.where(valid, ct.astype(jnp.float32), 0.0) / cfg.temperature
    d_student = _implementation(cfg.impl).backward(student, teacher, residual, coef, valid, cfg)
    # The teacher is a constant and the mask is boolean: symbolic zero cotangents.
    return d_student, None, None


_generalized_jsd.defvjp(_fwd, _bwd)


def generalized_jsd_reference(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    alpha: float,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Dense ``jnp`` D_α (materializes log-softmaxes), differentiable by autodiff.

    The plain formulation the fused kernels replace; masked rows are zeroed before any
    arithmetic and every p·log p term is double-where guarded so 0·log 0 = 0 in the gradient.
    """
    _check_logits(student_logits, teacher_logits)
    check_alpha_temperature(alpha, temperature)
    valid = row_mask(mask, student_logits.shape[0])[:, None]
    s = jnp.where(valid, student_logits.astype(jnp.float32), 0.0)
    t = jnp.where(valid, jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), 0.0)
    lp_s = jax.nn.log_softmax(s / temperature, axis=-1)
    lp_t = jax.nn.log_softmax(t / temperature, axis=-1)

    def kl(lp_a, lp_b):
        sup = lp_a > -jnp.inf
        a = jnp.where(sup, lp_a, 0.0)
        b = jnp.where(sup, lp_b, 0.0)
        return jnp.where(sup, jnp.exp(a) * (a - b), 0.0).sum(-1)

    if alpha == 0:
        d = kl(lp_t, lp_s)
    elif alpha == 1:
        d = kl(lp_s, lp_t)
    else:
        neither = (lp_s == -jnp.inf) & (lp_t == -jnp.inf)
        log_m = jnp.logaddexp(
            jnp.where(neither, 0.0, lp_t + math.log(alpha)),
            jnp.where(neither, 0.0, lp_s + math.log1p(-alpha)),
        )
        d = alpha * kl(lp_t, log_m) + (1 - alpha) * kl(lp_s, log_m)
    return jnp.where(valid[:, 0], d, 0.0)
