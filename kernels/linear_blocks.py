"""The sweep over the LM head's column blocks, shared by every fused-linear op.

A fused-linear op never forms the ``[N, V]`` logits h @ W. It walks the vocabulary in blocks of
``width`` columns: each step slices W[:, block] in place (``lax.dynamic_slice``; the last
block's start is clamped to V − width, so it overlaps its predecessor and a ``new`` mask marks
the columns not seen before) and forms that block's ``[N, width]`` float32 logits. Its backward
turns each block's logit gradient G into

    ∂h += G_new W[:, block]ᵀ      (G_new: G with the already-counted columns zeroed)
    ∂W[:, block] = hᵀ G           (written in place; an overlapped column is rewritten with the
                                   same value)

so the temporaries are a few ``[N, width]`` tiles and one ``[N, D]`` float32 accumulator,
whatever V is. The ops differ only in what they fold per block and in G.

A head is an LM-head weight ``[D, V]`` (layout "DV") or a tied model's embedding table
``[V, D]`` ("VD"); blocks are sliced along its vocabulary axis and ∂W is written in the same
layout, so neither direction transposes the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from kernels.jsd_math import NEG_INF
from kernels.jsd_xla import block_start_and_mask, vocab_blocks


def poison_enabled() -> bool:
    """Whether tests asked for NaN-filled output buffers (``kernels.set_poison_outputs``)."""
    from kernels import jsd

    return bool(jsd._POISON)


HEAD_LAYOUTS = ("DV", "VD")


def check_head(name: str, head, layout: str, width: int, layout_name: str = "head_layout") -> int:
    """V of a head given in ``layout`` whose model dimension must be ``width``; else ValueError.

    "DV" is an LM-head weight ``[D, V]``; "VD" is an embedding table ``[V, D]`` used as the head
    (tied embeddings). Pass the table itself with "VD" rather than ``table.T``: XLA materializes
    a transposed operand that a loop slices, and the gradient's transpose back costs another
    ``[V, D]`` copy.
    """
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"{layout_name} must be one of {HEAD_LAYOUTS}, got {layout!r}")
    if head.ndim != 2:
        raise ValueError(f"{name} must be 2-D ({layout}), got shape {head.shape}")
    d_axis = 0 if layout == "DV" else 1
    if head.shape[d_axis] != width:
        want = "[D, V]" if layout == "DV" else "[V, D]"
        raise ValueError(
            f"{name} {head.shape} must be {want} ({layout_name}={layout!r}) with D = {width}"
        )
    return head.shape[1 - d_axis]


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """How an op reads a head (hashable, part of the op's static config).

    layout: "DV" for a ``[D, V]`` weight, "VD" for a ``[V, D]`` embedding table.
    dtype: the dtype both matmul operands are cast to, block by block (e.g. "bfloat16" for a
      float32 master head in a bfloat16 model: casting the whole head first would hold a
      ``[V, D]`` copy); None takes the promotion of the hidden states' and the head's dtypes.
    """

    layout: str = "DV"
    dtype: str | None = None

    @property
    def vocab_axis(self) -> int:
        return 1 if self.layout == "DV" else 0

    def vocab(self, head) -> int:
        return head.shape[self.vocab_axis]

    def operand_dtype(self, hidden, head):
        return jnp.dtype(self.dtype) if self.dtype else jnp.result_type(hidden.dtype, head.dtype)


def check_dtype(name: str, dtype) -> str | None:
    """A matmul dtype argument as a hashable name (None stays None); ValueError if not float."""
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{name} must be a floating dtype or None, got {dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype or None, got {dtype!r}")
    return dt.name


def _logits(hidden, head_block, spec: HeadSpec, dt):
    """hidden [N, D] times a head block ([D, w] or [w, D]) -> [N, w] float32."""
    contract = (((1,), (0,)), ((), ())) if spec.layout == "DV" else (((1,), (1,)), ((), ()))
    return lax.dot_general(
        hidden.astype(dt), head_block.astype(dt), contract, preferred_element_type=jnp.float32
    )


def block_logits(hidden, head, k, width: int, spec: HeadSpec = HeadSpec()):
    """(start, new [1, width] bool, logits [N, width] float32, head block) of block k."""
    start, new = block_start_and_mask(k, spec.vocab(head), width)
    head_block = lax.dynamic_slice_in_dim(head, start, width, axis=spec.vocab_axis)
    logits = _logits(hidden, head_block, spec, spec.operand_dtype(hidden, head))
    return start, new, logits, head_block


def teacher_block(teacher: tuple, start, width: int, spec: HeadSpec = HeadSpec()):
    """The teacher's ``[N, width]`` float32 logits of the block at ``start``.

    ``teacher`` is ``(logits [N, V],)`` (sliced in place) or ``(hidden [N, Dt], head)`` with the
    head read as ``spec`` says (logits formed like the student's).
    """
    if len(teacher) == 1:
        return lax.dynamic_slice_in_dim(teacher[0], start, width, axis=1).astype(jnp.float32)
    t_hidden, t_head = teacher
    t_block = lax.dynamic_slice_in_dim(t_head, start, width, axis=spec.vocab_axis)
    return _logits(t_hidden, t_block, spec, spec.operand_dtype(t_hidden, t_head))


def shift(m_old, m_new, tau: float):
    """(m_new − m_old)/τ ≥ 0, the re-basing of a running maximum; 0 while nothing was seen."""
    return jnp.where(m_old == NEG_INF, 0.0, (m_new - m_old) / tau)


def entropy_update(acc, z_old, m_old, m_new, x, tau: float):
    """Folds one tile into A = Σ_v exp(y_v)·y_v, y = (x − m)/τ, kept under the running max m.

    With Z = Σ exp(y), the entropy of softmax(x/τ) is H = log Z − A/Z. When the maximum moves by
    Δ = (m_new − m_old)/τ, every old term becomes exp(y − Δ)(y − Δ), so A ← exp(−Δ)(A − Δ·Z_old).
    ``x`` is float32 ``[R, C]`` with −inf for entries of zero mass (they contribute 0).
    """
    d = shift(m_old, m_new, tau)
    sup = x > NEG_INF
    y = jnp.where(sup, (x - jnp.where(m_new == NEG_INF, 0.0, m_new)) / tau, 0.0)
    terms = jnp.where(sup, jnp.exp(y) * y, 0.0)
    return jnp.exp(-d) * (acc - d * z_old) + terms.sum(axis=-1, keepdims=True)


def backward_sweep(
    hidden: jax.Array,
    head: jax.Array,
    block_grad: Callable,
    block_vocab: int,
    poison: bool,
    spec: HeadSpec = HeadSpec(),
) -> tuple[jax.Array, jax.Array]:
    """(∂h [N, D] in hidden's dtype, ∂W in head's shape and dtype) from a per-block logit gradient.

    ``block_grad(start, logits [N, width] f32) -> G [N, width] f32`` must already include the
    row cotangents, the mask and 1/τ. G is rounded to the matmul dtype before both products
    (float32 accumulation). With ``poison`` the ∂W buffer starts as NaN, so a column block the
    sweep never writes shows up in a test.
    """
    axis = spec.vocab_axis
    rows, vocab = hidden.shape[0], spec.vocab(head)
    width, num_blocks = vocab_blocks(vocab, block_vocab)
    dt = spec.operand_dtype(hidden, head)
    hidden_dt = hidden.astype(dt)
    # ∂h = G Wᵀ contracts G's columns with the head's vocabulary axis; ∂W = hᵀG (DV) or Gᵀh (VD).
    d_hidden_dims = (((1,), (axis,)), ((), ()))

    def step(k, carry):
        d_hidden, d_head = carry
        start, new, logits, head_block = block_logits(hidden, head, k, width, spec)
        g = block_grad(start, logits).astype(dt)
        # The clamped last block overlaps its predecessor: its already-counted columns must not
        # add to ∂h again, while ∂W for them is rewritten with the same values.
        g_new = jnp.where(new, g, jnp.zeros((), dt))
        d_hidden = d_hidden + lax.dot_general(
            g_new, head_block.astype(dt), d_hidden_dims, preferred_element_type=jnp.float32
        )
        pair = (hidden_dt, g) if spec.layout == "DV" else (g, hidden_dt)
        d_block = lax.dot_general(
            *pair, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        d_head = lax.dynamic_update_slice_in_dim(
            d_head, d_block.astype(head.dtype), start, axis=axis
        )
        return d_hidden, d_head

    init = (
        jnp.zeros((rows, hidden.shape[1]), jnp.float32),
        jnp.full(head.shape, jnp.nan if poison else 0, head.dtype),
    )
    d_hidden, d_head = lax.fori_loop(0, num_blocks, step, init)
    return d_hidden.astype(hidden.dtype), d_head
