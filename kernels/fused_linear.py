"""Divergence straight from hidden states and the LM head: student logits never exist as [N, V].

    D_n = D_α(p_T,n, p_S,n),   p_S,n = softmax(h_n W / τ),   h [N, D], W [D, V]

The forward sweeps the vocabulary in blocks of ``block_vocab`` columns: each step slices
W[:, block] in place (``lax.dynamic_slice``), forms that block's logits h @ W[:, block]
(``[N, block]`` float32) and folds them into the online statistics of kernels.jsd_math; the
interior α takes a second sweep. Saved for the backward: the inputs and five numbers per row.

The backward is an explicit ``custom_vjp`` that sweeps once more, recomputing each block's
logits and its logit gradient G = ∂(Σ ct·D)/∂logits[:, block] from the saved normalizers, then

    ∂/∂h += G W[:, block]ᵀ        (an [N, D] float32 accumulator)
    ∂/∂W[:, block] = hᵀ G         (written in place into the [D, V] gradient)

Letting autodiff differentiate a checkpointed scan instead keeps the scan's per-step carries
and transposed weight copies alive (≈ 21% of the naive memory at Qwen2.5-0.5B scale, see
DESIGN.md); here the temporaries are a few [N, block] tiles and the [N, D] accumulator, the
same at any V. The teacher is either its logits ``[N, V]`` (sliced per block) or a pair
(teacher_hidden ``[N, Dt]``, teacher_head ``[Dt, V]``), whose logits are formed per block too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import jsd_math
from kernels.config import DEFAULT_BLOCK_SIZES, BlockSizes, Static
from kernels.jsd import check_alpha_temperature, row_mask
from kernels.jsd_xla import block_start_and_mask, sweep, vocab_blocks


def _check(student_hidden, student_head, teacher) -> tuple:
    if student_hidden.ndim != 2 or student_head.ndim != 2:
        raise ValueError(
            f"expected student_hidden [N, D] and student_head [D, V]; got "
            f"{student_hidden.shape} and {student_head.shape}"
        )
    rows, width = student_hidden.shape
    if student_head.shape[0] != width:
        raise ValueError(
            f"student_head {student_head.shape} must be [D, V] with D = {width} "
            f"(student_hidden is {student_hidden.shape})"
        )
    vocab = student_head.shape[1]
    if isinstance(teacher, (tuple, list)):
        if len(teacher) != 2:
            raise ValueError(
                "teacher must be logits [N, V] or a pair (hidden [N, Dt], head [Dt, V])"
            )
        t_hidden, t_head = teacher
        if t_hidden.ndim != 2 or t_head.ndim != 2 or t_hidden.shape[1] != t_head.shape[0]:
            raise ValueError(
                f"teacher pair must be hidden [N, Dt] and head [Dt, V]; got {t_hidden.shape} "
                f"and {t_head.shape}"
            )
        if t_hidden.shape[0] != rows:
            raise ValueError(f"teacher_hidden has {t_hidden.shape[0]} rows, student has {rows}")
        t_vocab = t_head.shape[1]
        teacher = (t_hidden, t_head)
    else:
        if teacher.ndim != 2 or teacher.shape[0] != rows:
            raise ValueError(f"teacher logits must be [N, V] with N = {rows}, got {teacher.shape}")
        t_vocab = teacher.shape[1]
        teacher = (teacher,)
    if t_vocab != vocab:
        raise ValueError(
            f"vocabulary mismatch: student head V={vocab}, teacher V={t_vocab}; token-level "
            "distillation needs one vocabulary"
        )
    return teacher


def fused_linear_jsd(
    student_hidden: jax.Array,
    student_head: jax.Array,
    teacher,
    *,
    alpha: float,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    impl: str | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Per-row D_α with student logits = student_hidden @ student_head, never materialized.

    Args:
      student_hidden: ``[N, D]`` final hidden states (after the last norm).
      student_head: ``[D, V]`` LM-head weight (for tied embeddings pass ``embedding.T``; XLA
        folds the transpose into the sliced matmul).
      teacher: logits ``[N, V]``, or a pair ``(teacher_hidden [N, Dt], teacher_head [Dt, V])``.
        Constant (stop-gradient) either way.
      alpha, temperature, mask: as in ``kernels.generalized_jsd``. Masked rows' hidden states
        are replaced by zeros, so garbage there reaches neither output nor gradients.
      impl: None or ``"xla"``. The blocks here are matmuls, which XLA already tiles well on
        every backend; the Pallas kernels implement ``generalized_jsd``.
      block_sizes: ``block_vocab`` sets the columns per step (default 4096).

    Returns:
      ``[N]`` float32 divergences; gradients flow to student_hidden and student_head.
    """
    teacher = _check(student_hidden, student_head, teacher)
    check_alpha_temperature(alpha, temperature)
    if impl not in (None, "xla"):
        raise ValueError(
            f"fused_linear_jsd supports impl=None or 'xla', got {impl!r} (its per-block work is "
            "a matmul that XLA tiles itself; the Pallas kernels serve generalized_jsd)"
        )
    blocks = DEFAULT_BLOCK_SIZES["xla"] if block_sizes is None else block_sizes
    if not isinstance(blocks, BlockSizes):
        raise ValueError(f"block_sizes must be a kernels.BlockSizes, got {blocks!r}")
    from kernels.jsd import _POISON

    cfg = Static(
        alpha=float(alpha),
        temperature=float(temperature),
        impl="xla",
        blocks=blocks,
        interpret=False,
        poison=_POISON,
    )
    valid = row_mask(mask, student_hidden.shape[0])
    hidden = jnp.where(valid[:, None], student_hidden, 0)
    teacher = tuple(lax.stop_gradient(x) for x in teacher)
    if len(teacher) == 2:
        teacher = (jnp.where(valid[:, None], teacher[0], 0), teacher[1])
    return _fused(cfg, hidden, student_head, teacher, valid)


def _loader(hidden, head, teacher, width: int):
    vocab = head.shape[1]

    def load(k):
        start, _ = block_start_and_mask(k, vocab, width)
        head_block = lax.dynamic_slice_in_dim(head, start, width, axis=1)
        s = jnp.dot(hidden, head_block, preferred_element_type=jnp.float32)
        if len(teacher) == 1:
            t = lax.dynamic_slice_in_dim(teacher[0], start, width, axis=1).astype(jnp.float32)
        else:
            t_block = lax.dynamic_slice_in_dim(teacher[1], start, width, axis=1)
            t = jnp.dot(teacher[0], t_block, preferred_element_type=jnp.float32)
        return start, s, t, head_block

    return load


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg: Static, hidden, head, teacher, valid):
    return _fwd(cfg, hidden, head, teacher, valid)[0]


def _fwd(cfg: Static, hidden, head, teacher, valid):
    rows, vocab = hidden.shape[0], head.shape[1]
    width, num_blocks = vocab_blocks(vocab, cfg.blocks.block_vocab)
    load = _loader(hidden, head, teacher, width)
    div, stats, c = sweep(lambda k: load(k)[:3], rows, vocab, width, num_blocks, cfg)
    div = jnp.where(valid, div[:, 0], 0.0)
    return div, (hidden, head, teacher, valid, stats, c)


def _bwd(cfg: Static, saved, ct):
    hidden, head, teacher, valid, stats, c = saved
    rows, vocab = hidden.shape[0], head.shape[1]
    width, num_blocks = vocab_blocks(vocab, cfg.blocks.block_vocab)
    load = _loader(hidden, head, teacher, width)
    coef = (jnp.where(valid, ct.astype(jnp.float32), 0.0) / cfg.temperature)[:, None]
    valid_col = valid[:, None]

    def step(k, carry):
        d_hidden, d_head = carry
        start, s, t, head_block = load(k)
        _, new = block_start_and_mask(k, vocab, width)
        g = jsd_math.student_grad(stats, c, s, t, alpha=cfg.alpha, tau=cfg.temperature)
        g = jnp.where(valid_col, coef * g, 0.0).astype(head.dtype)
        # The clamped last block overlaps its predecessor: its already-counted columns must not
        # add to ∂h again, while ∂W for them is rewritten with the same values.
        g_new = jnp.where(new, g, jnp.zeros((), g.dtype))
        d_hidden = d_hidden + lax.dot_general(
            g_new, head_block, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        d_block = lax.dot_general(
            hidden, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        d_head = lax.dynamic_update_slice_in_dim(d_head, d_block.astype(head.dtype), start, axis=1)
        return d_hidden, d_head

    fill = jnp.nan if cfg.poison else 0
    init = (
        jnp.zeros((rows, hidden.shape[1]), jnp.float32),
        jnp.full(head.shape, fill, head.dtype),
    )
    d_hidden, d_head = lax.fori_loop(0, num_blocks, step, init)
    teacher_ct = tuple(None for _ in teacher)
    return d_hidden.astype(hidden.dtype), d_head, teacher_ct, None


_fused.defvjp(_fwd, _bwd)
