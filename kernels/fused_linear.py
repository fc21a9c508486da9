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
Either head may instead be a tied model's ``[V, D]`` embedding table (``head_layout="VD"``).
The block sweep itself lives in kernels.linear_blocks, shared with fused_linear_logprobs and
fused_linear_kl_pair; ``check_inputs`` and ``prepare`` here serve the pair op too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels import jsd_math, linear_blocks
from kernels.config import DEFAULT_BLOCK_SIZES, BlockSizes, Static
from kernels.jsd import check_alpha_temperature, row_mask
from kernels.jsd_xla import sweep, vocab_blocks


def check_inputs(student_hidden, student_head, teacher, head_layout: str, teacher_head_layout: str):
    """The teacher as ``(logits,)`` or ``(hidden, head)``, after checking every shape; V.

    Raises ValueError naming the first mismatch (ranks, N, D, V, layouts).
    """
    if student_hidden.ndim != 2:
        raise ValueError(f"student_hidden must be [N, D], got shape {student_hidden.shape}")
    rows, width = student_hidden.shape
    vocab = linear_blocks.check_head("student_head", student_head, head_layout, width)
    if isinstance(teacher, (tuple, list)):
        if len(teacher) != 2:
            raise ValueError(
                "teacher must be logits [N, V] or a pair (hidden [N, Dt], head [Dt, V])"
            )
        t_hidden, t_head = teacher
        if t_hidden.ndim != 2:
            raise ValueError(f"teacher_hidden must be [N, Dt], got shape {t_hidden.shape}")
        if t_hidden.shape[0] != rows:
            raise ValueError(f"teacher_hidden has {t_hidden.shape[0]} rows, student has {rows}")
        t_vocab = linear_blocks.check_head(
            "teacher_head", t_head, teacher_head_layout, t_hidden.shape[1], "teacher_head_layout"
        )
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
    return teacher, vocab


def check_block_sizes(block_sizes) -> BlockSizes:
    blocks = DEFAULT_BLOCK_SIZES["xla"] if block_sizes is None else block_sizes
    if not isinstance(blocks, BlockSizes):
        raise ValueError(f"block_sizes must be a kernels.BlockSizes, got {blocks!r}")
    return blocks


def prepare(student_hidden, teacher: tuple, mask):
    """(hidden, teacher, valid): masked rows' hidden states zeroed, the teacher stop-gradient."""
    valid = row_mask(mask, student_hidden.shape[0])
    hidden = jnp.where(valid[:, None], student_hidden, jnp.zeros((), student_hidden.dtype))
    teacher = tuple(lax.stop_gradient(x) for x in teacher)
    if len(teacher) == 2:
        teacher = (jnp.where(valid[:, None], teacher[0], jnp.zeros((), teacher[0].dtype)),
                   teacher[1])  # fmt: skip
    return hidden, teacher, valid


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
    head_layout: str = "DV",
    teacher_head_layout: str = "DV",
    compute_dtype=None,
) -> jax.Array:
    """Per-row D_α with student logits = student_hidden @ student_head, never materialized.

    Args:
      student_hidden: ``[N, D]`` final hidden states (after the last norm).
      student_head: ``[D, V]`` LM-head weight, or with ``head_layout="VD"`` the ``[V, D]``
        embedding table of a tied model (pass the table, not its transpose: a transposed
        operand costs a ``[D, V]`` copy, see linear_blocks.check_head).
      teacher: logits ``[N, V]``, or a pair ``(teacher_hidden [N, Dt], teacher_head)`` with the
        head ``[Dt, V]`` (or ``[V, Dt]`` with ``teacher_head_layout="VD"``). Constant
        (stop-gradient) either way.
      alpha, temperature, mask: as in ``kernels.generalized_jsd``. Masked rows' hidden states
        are replaced by zeros, so garbage there reaches neither output nor gradients.
      impl: None or ``"xla"``. The blocks here are matmuls, which XLA already tiles well on
        every backend; the Pallas kernels implement ``generalized_jsd``.
      block_sizes: ``block_vocab`` sets the columns per step (default 4096).
      head_layout, teacher_head_layout: "DV" (default) or "VD".
      compute_dtype: the dtype both operands of every block matmul are cast to (float32
        accumulation), e.g. bfloat16 for a float32 head in a bfloat16 model; None: the
        promotion of the operands' dtypes. Gradients keep the inputs' dtypes.

    Returns:
      ``[N]`` float32 divergences; gradients flow to student_hidden and student_head (the
      latter in student_head's layout and dtype).
    """
    teacher, _ = check_inputs(student_hidden, student_head, teacher, head_layout,
                              teacher_head_layout)  # fmt: skip
    check_alpha_temperature(alpha, temperature)
    if impl not in (None, "xla"):
        raise ValueError(
            f"fused_linear_jsd supports impl=None or 'xla', got {impl!r} (its per-block work is "
            "a matmul that XLA tiles itself; the Pallas kernels serve generalized_jsd)"
        )
    cfg = Static(
        alpha=float(alpha),
        temperature=float(temperature),
        impl="xla",
        blocks=check_block_sizes(block_sizes),
        interpret=False,
        poison=linear_blocks.poison_enabled(),
    )
    dtype = linear_blocks.check_dtype("compute_dtype", compute_dtype)
    specs = (linear_blocks.HeadSpec(head_layout, dtype),
             linear_blocks.HeadSpec(teacher_head_layout, dtype))  # fmt: skip
    hidden, teacher, valid = prepare(student_hidden, teacher, mask)
    return _fused(cfg, specs, hidden, student_head, teacher, valid)


def _loader(hidden, head, teacher, width: int, specs):
    def load(k):
        start, _, s, _ = linear_blocks.block_logits(hidden, head, k, width, specs[0])
        return start, s, linear_blocks.teacher_block(teacher, start, width, specs[1])

    return load


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(cfg: Static, specs, hidden, head, teacher, valid):
    return _fwd(cfg, specs, hidden, head, teacher, valid)[0]


def _fwd(cfg: Static, specs, hidden, head, teacher, valid):
    rows, vocab = hidden.shape[0], specs[0].vocab(head)
    width, num_blocks = vocab_blocks(vocab, cfg.blocks.block_vocab)
    load = _loader(hidden, head, teacher, width, specs)
    div, stats, c = sweep(load, rows, vocab, width, num_blocks, cfg)
    div = jnp.where(valid, div[:, 0], 0.0)
    return div, (hidden, head, teacher, valid, stats, c)


def _bwd(cfg: Static, specs, saved, ct):
    hidden, head, teacher, valid, stats, c = saved
    width, _ = vocab_blocks(specs[0].vocab(head), cfg.blocks.block_vocab)
    coef = (jnp.where(valid, ct.astype(jnp.float32), 0.0) / cfg.temperature)[:, None]
    valid_col = valid[:, None]

    def block_grad(start, s):
        t = linear_blocks.teacher_block(teacher, start, width, specs[1])
        g = jsd_math.student_grad(stats, c, s, t, alpha=cfg.alpha, tau=cfg.temperature)
        return jnp.where(valid_col, coef * g, 0.0)

    d_hidden, d_head = linear_blocks.backward_sweep(
        hidden, head, block_grad, cfg.blocks.block_vocab, cfg.poison, specs[0]
    )
    return d_hidden, d_head, tuple(None for _ in teacher), None


_fused.defvjp(_fwd, _bwd)
