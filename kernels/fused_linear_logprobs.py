"""Token log-probabilities straight from hidden states and the LM head: no ``[N, V]`` logits.

    logp_n = log softmax(h_n W / τ)[y_n],   h [N, D], W [D, V], y [N] integer targets

The SFT cross-entropy is −mean(logp) over the loss mask; GRPO needs logp per completion token.
The forward sweeps the vocabulary in blocks (kernels.linear_blocks): per block it forms the
``[N, block]`` float32 logits, folds them into an online logsumexp per row (raw maximum m and
Z = Σ exp((x − m)/τ), as in kernels.jsd_math) and picks the target's logit from the block that
holds it. On request the same sweep also gives, per row and as constants for autodiff, the
entropy H = log Z − Σ_v exp(y_v) y_v / Z (y = (x − m)/τ) and whether argmax_v x_v == y (first
index on ties, as ``jnp.argmax``). Saved for the backward: the inputs and (m, log Z) per row.

The backward is an explicit ``custom_vjp`` that recomputes each block's logits and, with
p = exp((x − m)/τ − log Z) and ct the row cotangent,

    G = ct·(onehot(y) − p)/τ,   ∂h += G W[:, block]ᵀ,   ∂W[:, block] = hᵀ G

Rows with mask = 0 give logp 0, entropy 0, is_argmax False and zero gradients whatever their
hidden state holds (it is replaced by zeros first). A target outside [0, V) in a valid row gives
NaN (value and gradient) under jit, and a ValueError when the targets are concrete.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels import linear_blocks
from kernels.config import DEFAULT_BLOCK_SIZES, BlockSizes
from kernels.jsd import check_alpha_temperature, row_mask
from kernels.jsd_math import NEG_INF
from kernels.jsd_xla import vocab_blocks


class TokenLogprobs(NamedTuple):
    """Per-row results of ``fused_linear_logprobs``; each ``[N]``, 0 / False on masked rows.

    logp: float32 log softmax(h W / τ)[y], differentiable in hidden and head.
    entropy: float32 H(softmax(h W / τ)) in [0, log V], or None unless ``with_entropy``.
    is_argmax: bool argmax_v (h W)_v == y, or None unless ``with_argmax``.
    """

    logp: jax.Array
    entropy: jax.Array | None = None
    is_argmax: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class LogprobsConfig:
    """What the traced program depends on besides the arrays (hashable: a jit cache key)."""

    temperature: float
    block_vocab: int
    head: linear_blocks.HeadSpec
    with_entropy: bool
    with_argmax: bool
    poison: bool = False
    entropy_grad: bool = False


def _check(hidden, head, targets, temperature, head_layout, block_sizes, flags):
    """(block sizes, V) after checking every argument; ValueError naming the first bad one."""
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be [N, D], got shape {hidden.shape}")
    for name, x in (("hidden", hidden), ("head", head)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    rows, width = hidden.shape
    vocab = linear_blocks.check_head("head", head, head_layout, width)
    if targets.shape != (rows,):
        raise ValueError(f"targets must have shape [N] = ({rows},), got {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    check_alpha_temperature(1.0, temperature)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    blocks = DEFAULT_BLOCK_SIZES["xla"] if block_sizes is None else block_sizes
    if not isinstance(blocks, BlockSizes):
        raise ValueError(f"block_sizes must be a kernels.BlockSizes, got {blocks!r}")
    return blocks, vocab


def _check_target_range(targets, mask, vocab: int) -> None:
    """Out-of-range targets in counted rows, when targets (and mask) are concrete."""
    if isinstance(targets, jax.core.Tracer) or isinstance(mask, jax.core.Tracer):
        return
    y = np.asarray(targets)
    counted = np.ones(y.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    bad = counted & ((y < 0) | (y >= vocab))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"targets must lie in [0, V) = [0, {vocab}) on unmasked rows; row {row} has "
            f"{int(y[row])} ({int(bad.sum())} such rows)"
        )


def fused_linear_logprobs(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    head_layout: str = "DV",
    compute_dtype=None,
    block_sizes: BlockSizes | None = None,
    with_entropy: bool = False,
    with_argmax: bool = False,
    entropy_grad: bool = False,
) -> TokenLogprobs:
    """Per-row log softmax(hidden @ head / τ)[targets] without materializing the logits.

    Args:
      hidden: ``[N, D]`` final hidden states (after the last norm), float32 or bfloat16.
      head: ``[D, V]`` LM-head weight, or with ``head_layout="VD"`` the ``[V, D]`` embedding
        table of a tied model (pass the table, not its transpose: see linear_blocks.check_head).
      targets: ``[N]`` integer token ids in [0, V) (checked when concrete).
      temperature: the logits are divided by it (sampling temperature for GRPO logprobs).
      mask: optional ``[N]`` bool or 0/1; rows with 0 give 0 and zero gradients.
      head_layout: "DV" (default) or "VD", the layout of ``head``.
      compute_dtype: the dtype both operands of every block matmul are cast to (float32
        accumulation), e.g. bfloat16 for a float32 head in a bfloat16 model, without a whole
        cast copy of the head; None: the promotion of hidden's and head's dtypes.
      block_sizes: ``block_vocab`` sets the columns per step (default 4096).
      with_entropy, with_argmax: also return the entropy and the argmax hit (module docstring),
        computed in the same sweep; constants for autodiff.
      entropy_grad: the entropy is differentiable (module docstring); implies with_entropy.

    Returns:
      ``TokenLogprobs(logp, entropy, is_argmax)``; fields not requested are None. Gradients of
      ``logp`` flow to hidden (in its dtype) and head (in its dtype).

    Raises:
      ValueError: wrong ranks, mismatched N or D, non-float hidden/head, non-integer targets,
        targets out of range (when concrete), a mask that is not [N], temperature ≤ 0.
    """
    flags = {"with_entropy": with_entropy, "with_argmax": with_argmax,
             "entropy_grad": entropy_grad}  # fmt: skip
    with_entropy = with_entropy or entropy_grad
    targets = targets if isinstance(targets, jax.Array) else jnp.asarray(targets)
    blocks, vocab = _check(hidden, head, targets, temperature, head_layout, block_sizes, flags)
    valid = row_mask(mask, hidden.shape[0])
    _check_target_range(targets, mask, vocab)
    dtype = linear_blocks.check_dtype("compute_dtype", compute_dtype)
    cfg = LogprobsConfig(
        temperature=float(temperature),
        block_vocab=blocks.block_vocab,
        head=linear_blocks.HeadSpec(head_layout, dtype),
        with_entropy=with_entropy,
        with_argmax=with_argmax,
        poison=linear_blocks.poison_enabled(),
        entropy_grad=entropy_grad,
    )
    hidden = jnp.where(valid[:, None], hidden, jnp.zeros((), hidden.dtype))
    logp, entropy, is_argmax = _logprobs(cfg, hidden, head, targets.astype(jnp.int32), valid)
    if entropy is not None and not entropy_grad:
        entropy = lax.stop_gradient(entropy)
    return TokenLogprobs(logp, entropy, is_argmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logprobs(cfg: LogprobsConfig, hidden, head, targets, valid):
    return _fwd(cfg, hidden, head, targets, valid)[0]


def _forward_sweep(cfg: LogprobsConfig, hidden, head, targets):
    """Per-row (m, Z, A, target logit, argmax index), each ``[N, 1]``, in one sweep."""
    rows, vocab = hidden.shape[0], cfg.head.vocab(head)
    width, num_blocks = vocab_blocks(vocab, cfg.block_vocab)
    tau = cfg.temperature
    y = targets[:, None]

    def step(k, state):
        m, z, acc, picked, best = state
        start, new, x, _ = linear_blocks.block_logits(hidden, head, k, width, cfg.head)
        cols = start + lax.broadcasted_iota(jnp.int32, (1, width), 1)
        x = jnp.where(new, x, NEG_INF)  # columns already counted by the previous block
        block_max = x.max(axis=-1, keepdims=True)
        m_new = jnp.maximum(m, block_max)
        e = jnp.where(new, jnp.exp((x - m_new) / tau), 0.0)
        z_new = z * jnp.exp(-linear_blocks.shift(m, m_new, tau)) + e.sum(axis=-1, keepdims=True)
        if cfg.with_entropy:
            acc = linear_blocks.entropy_update(acc, z, m, m_new, x, tau)
        picked = picked + jnp.where(new & (cols == y), x, 0.0).sum(axis=-1, keepdims=True)
        if cfg.with_argmax:
            # Strictly greater: on a tie the earlier block keeps its (smaller) index.
            local = jnp.argmax(x, axis=-1, keepdims=True).astype(jnp.int32)
            best = jnp.where(block_max > m, start + local, best)
        return m_new, z_new, acc, picked, best

    neg = jnp.full((rows, 1), NEG_INF, jnp.float32)
    zero = jnp.zeros((rows, 1), jnp.float32)
    init = (neg, zero, zero, zero, jnp.full((rows, 1), -1, jnp.int32))
    return lax.fori_loop(0, num_blocks, step, init)


def _fwd(cfg: LogprobsConfig, hidden, head, targets, valid):
    vocab = cfg.head.vocab(head)
    m, z, acc, picked, best = (x[:, 0] for x in _forward_sweep(cfg, hidden, head, targets))
    log_z = jnp.log(z)
    in_range = (targets >= 0) & (targets < vocab)
    logp = (picked - m) / cfg.temperature - log_z
    logp = jnp.where(valid, jnp.where(in_range, logp, jnp.nan), 0.0)
    entropy = is_argmax = None
    if cfg.with_entropy:
        entropy = jnp.clip(log_z - acc / z, 0.0, math.log(vocab))
        entropy = jnp.where(valid, entropy, 0.0)
    if cfg.with_argmax:
        is_argmax = valid & (best == targets)
    return (logp, entropy, is_argmax), (hidden, head, targets, valid, m, log_z, entropy)


def _bwd(cfg: LogprobsConfig, saved, ct):
    hidden, head, targets, valid, m, log_z, entropy = saved
    ct_logp = ct[0]  # is_argmax is a constant; the entropy too unless entropy_grad
    vocab = cfg.head.vocab(head)
    width, _ = vocab_blocks(vocab, cfg.block_vocab)
    tau = cfg.temperature
    in_range = (targets >= 0) & (targets < vocab)
    coef = jnp.where(valid, ct_logp.astype(jnp.float32) / tau, 0.0)
    coef = jnp.where(valid & ~in_range, jnp.nan, coef)[:, None]
    m, log_z, y = m[:, None], log_z[:, None], targets[:, None]
    coef_h = None
    if cfg.entropy_grad:
        coef_h = jnp.where(valid, ct[1].astype(jnp.float32) / tau, 0.0)[:, None]
        entropy = entropy[:, None]

    def block_grad(start, x):
        cols = start + lax.broadcasted_iota(jnp.int32, (1, width), 1)
        log_p = (x - m) / tau - log_z
        p = jnp.exp(log_p)
        g = coef * ((cols == y).astype(jnp.float32) - p)
        if coef_h is not None:
            # p·(log p + H), with 0·log 0 = 0 at columns of zero mass.
            g = g - coef_h * jnp.where(p > 0, p * (log_p + entropy), 0.0)
        return g

    d_hidden, d_head = linear_blocks.backward_sweep(
        hidden, head, block_grad, cfg.block_vocab, cfg.poison, cfg.head
    )
    return d_hidden, d_head, None, None


_logprobs.defvjp(_fwd, _bwd)


def fused_linear_logprobs_reference(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    head_layout: str = "DV",
    entropy_grad: bool = False,
) -> TokenLogprobs:
    """Dense ``jnp`` formula (materializes ``[N, V]`` logits), differentiable by autodiff.

    What the fused op replaces: logits = h @ W in float32, log_softmax(logits / τ), the target's
    entry, the entropy (a constant unless ``entropy_grad``) and the argmax hit, all three always
    returned. Masked rows are zeroed before any arithmetic, as in the fused op.
    """
    targets = jnp.asarray(targets)
    _check(hidden, head, targets, temperature, head_layout, None, {})
    valid = row_mask(mask, hidden.shape[0])
    h = jnp.where(valid[:, None], hidden, jnp.zeros((), hidden.dtype))
    w = head if head_layout == "DV" else head.T
    dt = jnp.result_type(hidden.dtype, head.dtype)
    logits = jnp.dot(h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
    is_argmax = jnp.argmax(logits, axis=-1) == targets
    entropy = entropy if entropy_grad else lax.stop_gradient(entropy)
    return TokenLogprobs(
        jnp.where(valid, logp, 0.0),
        jnp.where(valid, entropy, 0.0),
        valid & is_argmax,
    )
