"""Pallas GPU (Triton) kernels for the fused divergence: one program per row.

Each program owns one row of both logits (a ``[V]`` view in global memory) and walks it in
``block_vocab``-wide masked loads (Triton tiles must be powers of two; columns past V load as
−inf, i.e. zero mass). At N = 8192 tokens one row per program already gives the GPU tens of
thousands of warps, and every reduction stays inside a program: no atomics, no second kernel.

Forward: one sweep for the KL endpoints, two for the interior (the second with fixed
normalizers, since log M needs both), then eight per-row numbers are written (``LANE``).
Backward: one sweep recomputing each tile's probabilities from those numbers and storing the
gradient tile. The math is kernels.jsd_math on ``[1, block_vocab]`` tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import jsd_math
from kernels.config import Static

ROW_DATA = 8  # per-row numbers, a power of two so the row-data tile is a legal Triton tensor
LANE = {"m_s": 0, "lz_s": 1, "m_t": 2, "lz_t": 3, "c": 4, "div": 5, "coef": 6, "valid": 7}


def _width(vocab: int, cfg: Static) -> int:
    # Clamped to the vocabulary rounded up to a power of two (tiles must stay powers of two).
    return min(cfg.blocks.block_vocab, pl.next_power_of_2(vocab))


def _compiler_params(width: int):
    # Liger's heuristic: a warp per 256 columns of the tile, at most 32 warps... capped at 16
    # here, since every thread also holds both rows' float32 tiles and their temporaries.
    return plgpu.CompilerParams(num_warps=min(max(width // 256, 1), 16), num_stages=1)


def _load(ref, k, width: int, vocab: int):
    """Tile k of a row as float32 ``[1, width]``, −inf past the vocabulary."""
    cols = k * width + lax.iota(jnp.int32, width)
    in_vocab = cols < vocab
    x = plgpu.load(ref.at[pl.ds(k * width, width)], mask=in_vocab, other=jsd_math.NEG_INF)
    x = jsd_math.mask_columns(x, in_vocab)
    return x[None, :], in_vocab


def _forward_kernel(s_ref, t_ref, out_ref, *, cfg: Static, vocab: int, width: int):
    alpha, tau = cfg.alpha, cfg.temperature
    num_blocks = pl.cdiv(vocab, width)

    def online(k, state):
        s, _ = _load(s_ref, k, width, vocab)
        t, _ = _load(t_ref, k, width, vocab)
        return jsd_math.online_update(state, s, t, alpha=alpha, tau=tau)

    state = lax.fori_loop(0, num_blocks, online, jsd_math.init_online(1))
    stats = jsd_math.row_stats(state)
    if jsd_math.is_endpoint(alpha):
        div = jsd_math.endpoint_divergence(state, stats, alpha=alpha)
        c = div
    else:

        def mixture(k, carry):
            s, _ = _load(s_ref, k, width, vocab)
            t, _ = _load(t_ref, k, width, vocab)
            d, c = jsd_math.mixture_terms(stats, s, t, alpha=alpha, tau=tau)
            return carry[0] + d, carry[1] + c

        zero = jnp.zeros((1, 1), jnp.float32)
        div, c = lax.fori_loop(0, num_blocks, mixture, (zero, zero))
    fields = {
        "m_s": stats.m_s,
        "lz_s": stats.lz_s,
        "m_t": stats.m_t,
        "lz_t": stats.lz_t,
        "c": c,
        "div": div,
    }
    lane = lax.iota(jnp.int32, ROW_DATA)
    tile = jnp.zeros((ROW_DATA,), jnp.float32)
    for name, value in fields.items():
        tile = jnp.where(lane == LANE[name], value.reshape(()), tile)
    out_ref[...] = tile


def _interpret(cfg: Static) -> bool:
    # Triton kernels interpret with a plain flag (the TPU interpreter takes InterpretParams).
    return bool(cfg.interpret)


def forward(student, teacher, cfg: Static):
    """(divergence [N] float32, row data [N, 8]) via one pallas_call, one program per row."""
    rows, vocab = student.shape
    width = _width(vocab, cfg)
    row = pl.BlockSpec((None, vocab), lambda i: (i, 0))
    out = pl.BlockSpec((None, ROW_DATA), lambda i: (i, 0))
    out_shape = jax.ShapeDtypeStruct((rows, ROW_DATA), jnp.float32)
    inputs, in_specs, aliases = [student, teacher], [row, row], {}
    if cfg.poison:
        inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs.append(out)
        aliases = {2: 0}
    kernel = functools.partial(_forward_kernel, cfg=cfg, vocab=vocab, width=width)
    if cfg.poison:
        kernel = _skip_poisoned(kernel, num_inputs=2)
    row_data = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(rows,),
        in_specs=in_specs,
        out_specs=out,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(width),
        interpret=_interpret(cfg),
        name="jsd_forward",
    )(*inputs)
    return row_data[:, LANE["div"]], row_data


def _skip_poisoned(kernel, num_inputs: int):
    """Drops the NaN-filled buffer that is aliased to the output (read by nobody)."""

    def wrapped(*refs):
        return kernel(*refs[:num_inputs], *refs[num_inputs + 1 :])

    return wrapped


def _backward_kernel(s_ref, t_ref, row_ref, ds_ref, *, cfg: Static, vocab: int, width: int):
    def lane(name):
        return jnp.full((1, 1), row_ref[LANE[name]], jnp.float32)

    stats = jsd_math.RowStats(lane("m_s"), lane("lz_s"), lane("m_t"), lane("lz_t"))
    valid = lane("valid") > 0
    coef, c = lane("coef"), lane("c")

    @pl.loop(0, pl.cdiv(vocab, width))
    def _tile(k):
        s, in_vocab = _load(s_ref, k, width, vocab)
        t, _ = _load(t_ref, k, width, vocab)
        g = jsd_math.student_grad(stats, c, s, t, alpha=cfg.alpha, tau=cfg.temperature)
        # Select, not multiply: a masked row's statistics may be NaN.
        g = jnp.where(valid, coef * g, 0.0).reshape(width).astype(ds_ref.dtype)
        plgpu.store(ds_ref.at[pl.ds(k * width, width)], g, mask=in_vocab)


def backward(student, teacher, row_data, coef, valid, cfg: Static):
    """∂(Σ ct·D)/∂student ``[N, V]`` in the student's dtype; ``coef`` = ct·valid/τ."""
    rows, vocab = student.shape
    width = _width(vocab, cfg)
    row_data = row_data.at[:, LANE["coef"]].set(coef).at[:, LANE["valid"]].set(valid)
    row = pl.BlockSpec((None, vocab), lambda i: (i, 0))
    small = pl.BlockSpec((None, ROW_DATA), lambda i: (i, 0))
    out_shape = jax.ShapeDtypeStruct(student.shape, student.dtype)
    inputs, in_specs, aliases = [student, teacher, row_data], [row, row, small], {}
    kernel = functools.partial(_backward_kernel, cfg=cfg, vocab=vocab, width=width)
    if cfg.poison:
        inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs.append(row)
        aliases = {3: 0}
        kernel = _skip_poisoned(kernel, num_inputs=3)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(rows,),
        in_specs=in_specs,
        out_specs=row,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(width),
        interpret=_interpret(cfg),
        name="jsd_backward",
    )(*inputs)
