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

Interpret mode is the caller's choice, as in jax's own Pallas ops (``flash_attention``): a
Pallas implementation compiles only on its backend (``pallas_tpu`` on a TPU, ``pallas_gpu`` on
a GPU) and runs anywhere with ``interpret=True`` (slowly: it is for tests). The op never picks
interpret mode itself, so a test that asks for a compiled kernel gets one or a clear error.

``generalized_jsd_reference`` is the one dense ``jnp`` implementation of D_α in the code base
(``jaxpost.opd.generalized_jsd`` is it); kernels.reference holds the float64 NumPy test oracle.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels import jsd_xla
from kernels.config import DEFAULT_BLOCK_SIZES, IMPLS, BlockSizes, Static

# The backends (``jax.default_backend()``) on which each Pallas implementation compiles.
COMPILES_ON = {"pallas_tpu": ("tpu",), "pallas_gpu": ("gpu",)}

_POISON = False


def set_poison_outputs(enabled: bool) -> None:
    """Test hook: NaN-fill every kernel output buffer before the kernel writes it."""
    global _POISON
    _POISON = bool(enabled)


def default_impl(backend: str | None = None) -> str:
    """The fastest implementation for a backend (default: ``jax.default_backend()``)."""
    backend = jax.default_backend() if backend is None else backend
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(backend, "xla")


def compiles_here(impl: str, backend: str | None = None) -> bool:
    """Whether ``impl`` runs compiled (``interpret=False``) on ``backend`` (default: this one)."""
    backend = jax.default_backend() if backend is None else backend
    return impl == "xla" or backend in COMPILES_ON[impl]


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


def check_interpret(impl: str, interpret) -> bool:
    """Whether to interpret ``impl`` (False for xla); raises if a compiled Pallas kernel cannot
    be built on this backend, naming ``interpret=True`` as the fix."""
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be True or False, got {interpret!r}")
    if impl == "xla":
        return False  # nothing to interpret: XLA compiles it on every backend
    backend = jax.default_backend()
    if not interpret and not compiles_here(impl, backend):
        raise ValueError(
            f"impl={impl!r} compiles only on {' or '.join(COMPILES_ON[impl])}, not on this "
            f"{backend!r} backend: pass interpret=True to run it in the Pallas interpreter "
            "(slow; for tests), or use impl='xla' or impl=None (the backend's best)"
        )
    return interpret


def row_mask(mask, rows: int) -> jax.Array:
    """``mask`` ([N] bool or 0/1 numbers, or None) as an [N] bool array."""
    if mask is None:
        return jnp.ones((rows,), bool)
    mask = jnp.asarray(mask)
    if mask.shape != (rows,):
        raise ValueError(f"mask must have shape [N] = ({rows},), got {mask.shape}")
    return mask.astype(bool)


def _check_pair(student_logits, teacher_logits, *, matrix: bool) -> None:
    """Floating-point logits of one vocabulary over the same rows; ``[N, V]`` if ``matrix``."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if matrix and x.ndim != 2:
            raise ValueError(f"{name} must be [N, V], got shape {x.shape}")
        if x.ndim < 1:
            raise ValueError(f"{name} must be [..., V], got a scalar")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"vocabulary mismatch: student V={student_logits.shape[-1]}, teacher "
            f"V={teacher_logits.shape[-1]}; token-level distillation needs one vocabulary"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"row mismatch: student logits {student_logits.shape} vs teacher logits "
            f"{teacher_logits.shape}; both must score the same positions"
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
    interpret: bool = False,
) -> jax.Array:
    """Per-row divergence D_α(p_T, p_S) over the vocabulary (module docstring), fused.

    Args:
      student_logits: ``[N, V]`` float32 or bfloat16; the only differentiable input.
      teacher_logits: ``[N, V]``, same N and V; treated as a constant (stop-gradient).
      alpha: 0 forward KL, 1 reverse KL, between the generalized JSD (a Python float).
      temperature: both logits are divided by it. No τ² factor is applied.
      mask: optional ``[N]`` bool or 0/1; rows with 0 give 0 and a zero gradient.
      impl: one of ``IMPLS``, or None for the best on ``jax.default_backend()``.
      block_sizes: tile sizes; None takes ``DEFAULT_BLOCK_SIZES[impl]``.
      interpret: run a Pallas implementation in the Pallas interpreter (any backend; for
        tests). False compiles it, which only its own backend can (``COMPILES_ON``). Ignored
        by ``impl="xla"``.

    Returns:
      ``[N]`` float32 divergences.

    Raises:
      ValueError: wrong ranks, mismatched N or V, non-float logits, a mask that is not [N],
        alpha outside [0, 1], temperature ≤ 0, an unknown impl, unusable block sizes, or a
        compiled Pallas implementation on a backend that cannot build it.
    """
    _check_pair(student_logits, teacher_logits, matrix=True)
    check_alpha_temperature(alpha, temperature)
    impl = resolve_impl(impl)
    blocks = DEFAULT_BLOCK_SIZES[impl] if block_sizes is None else block_sizes
    if not isinstance(blocks, BlockSizes):
        raise ValueError(f"block_sizes must be a kernels.BlockSizes, got {blocks!r}")
    blocks.check_for(impl)
    interpret = check_interpret(impl, interpret)  # last: every argument is valid by now
    valid = row_mask(mask, student_logits.shape[0])
    cfg = Static(alpha=float(alpha), temperature=float(temperature), impl=impl, blocks=blocks,
                 interpret=interpret, poison=_POISON)  # fmt: skip
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


# ---------------------------------------------------------------------------------------------
# the dense reference


def kl_from_logprobs(logp_a: jax.Array, logp_b: jax.Array) -> jax.Array:
    """KL(a ‖ b) over the last axis with 0·log 0 = 0: terms with a_v = 0 are dropped, and their
    inputs replaced by 0 *before* the arithmetic ("double where"), so no −inf − (−inf) = NaN
    reaches the backward pass either."""
    support = logp_a > -jnp.inf
    safe_a = jnp.where(support, logp_a, 0)
    safe_b = jnp.where(support, logp_b, 0)
    return jnp.where(support, jnp.exp(safe_a) * (safe_a - safe_b), 0).sum(-1)


def generalized_jsd_reference(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    alpha: float,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Dense ``jnp`` D_α over the last axis: the plain formulation the fused kernels replace.

    log M = logaddexp(log α + log p_T, log(1 − α) + log p_S), which never forms p_T or p_S in
    linear space. Materializes log-softmaxes of both inputs.

    Args:
      student_logits, teacher_logits: ``[..., V]`` of one shape, any leading dims.
      alpha, temperature: as in ``generalized_jsd``.
      mask: None, or the leading shape ``[...]`` (bool or 0/1): masked rows are zeroed before
        any arithmetic (garbage there, inf and NaN included, reaches neither value nor
        gradient) and give exactly 0.

    Returns:
      divergences of the leading shape, in float32 (float64 inputs stay float64).
      Differentiable by autodiff in *both* arguments; the fused op treats the teacher as a
      constant, so detach it (``lax.stop_gradient``) to compare with that.
    """
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _check_pair(student_logits, teacher_logits, matrix=False)
    check_alpha_temperature(alpha, temperature)
    dtype = jnp.result_type(student_logits.dtype, teacher_logits.dtype, jnp.float32)
    student, teacher = student_logits.astype(dtype), teacher_logits.astype(dtype)
    if mask is not None:
        valid = jnp.asarray(mask)
        if valid.shape != student.shape[:-1]:
            raise ValueError(f"mask must have the leading shape {student.shape[:-1]}, "
                             f"got {valid.shape}")  # fmt: skip
        valid = valid.astype(bool)
        student = jnp.where(valid[..., None], student, 0)
        teacher = jnp.where(valid[..., None], teacher, 0)
    logp_s = jax.nn.log_softmax(student / temperature, axis=-1)
    logp_t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    if alpha == 0:
        d = kl_from_logprobs(logp_t, logp_s)
    elif alpha == 1:
        d = kl_from_logprobs(logp_s, logp_t)
    else:
        # Where both models give an entry zero mass, M is zero too and both KL terms drop it;
        # feed logaddexp finite stand-ins there, since its gradient at (−inf, −inf) is NaN.
        neither = (logp_t == -jnp.inf) & (logp_s == -jnp.inf)
        log_m = jnp.logaddexp(
            jnp.where(neither, 0, logp_t + math.log(alpha)),
            jnp.where(neither, 0, logp_s + math.log1p(-alpha)),
        )
        d = alpha * kl_from_logprobs(logp_t, log_m) + (1 - alpha) * kl_from_logprobs(logp_s, log_m)
    return d if mask is None else jnp.where(valid, d, 0)
