"""The blockwise XLA implementation: ``lax.fori_loop`` over vocabulary blocks, all rows at once.

Portable (CPU, GPU, TPU) and the baseline the Pallas kernels are timed against. Each step
slices a ``[N, block_vocab]`` tile with ``lax.dynamic_slice`` (no padded copy of the input): the
last step's start is clamped to V − block_vocab, so it overlaps the previous one, and the
columns already counted are masked out of the sums (the gradient, being elementwise given the
row statistics, is simply written twice with the same value).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from kernels import jsd_math
from kernels.config import Static


def vocab_blocks(vocab: int, block_vocab: int) -> tuple[int, int]:
    """(block width, number of blocks) with the width clamped to the vocabulary."""
    width = min(block_vocab, vocab)
    return width, -(-vocab // width)


def block_start_and_mask(k, vocab: int, width: int):
    """Clamped start of block k and the ``[1, width]`` mask of columns not seen by block k − 1."""
    start = jnp.minimum(k * width, vocab - width)
    cols = start + lax.broadcasted_iota(jnp.int32, (1, width), 1)
    return start, cols >= k * width


def sweep(load_block, rows: int, vocab: int, width: int, num_blocks: int, cfg: Static):
    """Forward statistics from a block loader ``k -> (start, s [R, W], t [R, W])`` (float32).

    Returns ``(divergence [R, 1], stats, c [R, 1])``: one online sweep for the KL endpoints,
    a second sweep with fixed normalizers for the interior (its log M needs both).
    """
    alpha, tau = cfg.alpha, cfg.temperature

    def online_step(k, state):
        start, s, t = load_block(k)
        _, new = block_start_and_mask(k, vocab, width)
        s = jsd_math.mask_columns(s, new)
        t = jsd_math.mask_columns(t, new)
        return jsd_math.online_update(state, s, t, alpha=alpha, tau=tau)

    state = lax.fori_loop(0, num_blocks, online_step, jsd_math.init_online(rows))
    stats = jsd_math.row_stats(state)
    if jsd_math.is_endpoint(alpha):
        div = jsd_math.endpoint_divergence(state, stats, alpha=alpha)
        return div, stats, div

    def mixture_step(k, carry):
        start, s, t = load_block(k)
        _, new = block_start_and_mask(k, vocab, width)
        d, c = jsd_math.mixture_terms(
            stats,
            jsd_math.mask_columns(s, new),
            jsd_math.mask_columns(t, new),
            alpha=alpha,
            tau=tau,
        )
        return carry[0] + d, carry[1] + c

    zero = jnp.zeros((rows, 1), jnp.float32)
    div, c = lax.fori_loop(0, num_blocks, mixture_step, (zero, zero))
    return div, stats, c


def _logit_loader(student, teacher, width: int):
    vocab = student.shape[1]

    def load(k):
        start, _ = block_start_and_mask(k, vocab, width)
        s = lax.dynamic_slice_in_dim(student, start, width, axis=1).astype(jnp.float32)
        t = lax.dynamic_slice_in_dim(teacher, start, width, axis=1).astype(jnp.float32)
        return start, s, t

    return load


def forward(student, teacher, cfg: Static):
    """(divergence [N] float32, residual) for logits ``[N, V]``."""
    rows, vocab = student.shape
    width, num_blocks = vocab_blocks(vocab, cfg.blocks.block_vocab)
    load = _logit_loader(student, teacher, width)
    div, stats, c = sweep(load, rows, vocab, width, num_blocks, cfg)
    return div[:, 0], (stats, c)


def backward(student, teacher, residual, coef, valid, cfg: Static):
    """d(Σ_n ct_n D_n)/d student ``[N, V]`` in the student's dtype; ``coef`` = ct·valid/τ."""
    stats, c = residual
    rows, vocab = student.shape
    width, num_blocks = vocab_blocks(vocab, cfg.blocks.block_vocab)
    load = _logit_loader(student, teacher, width)
    coef = coef[:, None]
    valid = valid[:, None]

    def step(k, grad):
        start, s, t = load(k)
        g = jsd_math.student_grad(stats, c, s, t, alpha=cfg.alpha, tau=cfg.temperature)
        g = jnp.where(valid, coef * g, 0.0).astype(grad.dtype)
        return lax.dynamic_update_slice_in_dim(grad, g, start, axis=1)

    fill = jnp.nan if cfg.poison else 0
    init = jnp.full((rows, vocab), fill, student.dtype)
    return lax.fori_loop(0, num_blocks, step, init)
