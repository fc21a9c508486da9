"""Pallas TPU (Mosaic) kernels for the fused divergence.

Forward: grid (row blocks, passes, vocabulary blocks). Each program sees a
``[block_rows, block_vocab]`` VMEM tile of both logits and folds it into running per-row state
held in VMEM scratch across the two "arbitrary" (sequential) axes; rows are "parallel" (split
over TensorCores). The KL endpoints take one pass (the online accumulator of kernels.jsd_math);
the interior takes two, the second with fixed normalizers, because log M needs both. The last
step of a row block writes one ``[block_rows, 128]`` tile of per-row results.

Backward: grid (row blocks, vocabulary blocks), both parallel: each program recomputes its
tile's probabilities from the saved per-row numbers and writes its gradient tile, nothing else.

Per-row numbers travel as 128-lane rows (a TPU vector row is 128 lanes; a ``[N]`` vector would
not tile), in the lanes listed in ``LANE``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import jsd_math
from kernels.config import Static

LANES = 128
# Lane of each per-row number in the [N, 128] row-data array (forward output, backward input).
LANE = {"m_s": 0, "lz_s": 1, "m_t": 2, "lz_t": 3, "c": 4, "div": 5, "coef": 6, "valid": 7}


def _tiles(rows: int, vocab: int, cfg: Static) -> tuple[int, int]:
    # A block equal to the full dimension is always legal; otherwise BlockSizes.check_for
    # guaranteed the (8, 128) divisibility Mosaic needs, and Pallas pads the ragged last block.
    return min(cfg.blocks.block_rows, rows), min(cfg.blocks.block_vocab, vocab)


def _interpret(cfg: Static):
    # The interpreter allocates every output NaN-filled ("uninitialized_memory"), which is the
    # poisoning the tests want; it is spelled out because the tests rely on it.
    return pltpu.InterpretParams(uninitialized_memory="nan") if cfg.interpret else False


def _alias_poison(cfg: Static) -> bool:
    """Whether to poison by aliasing a NaN-filled input to the output (compiled kernels only:
    interpreted outputs start as NaN already, and the interpreter mishandles an aliased buffer
    whose rows it must pad to the block)."""
    return cfg.poison and not cfg.interpret


def _load(ref, k, width: int, vocab: int):
    """The tile as float32, with columns past the vocabulary (padding of the last tile) −inf."""
    x = ref[...]
    cols = k * width + lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jsd_math.mask_columns(x, cols < vocab)


def _read(ref):
    return ref[:, 0:1]


def _write(ref, value):
    ref[...] = jnp.broadcast_to(value, ref.shape)


def _pack(shape, **fields):
    """A [rows, 128] tile holding each [rows, 1] field in its lane (zeros elsewhere)."""
    lane = lax.broadcasted_iota(jnp.int32, shape, 1)
    tile = jnp.zeros(shape, jnp.float32)
    for name, value in fields.items():
        tile = jnp.where(lane == LANE[name], value, tile)
    return tile


def _forward_kernel(s_ref, t_ref, *refs, cfg: Static, vocab: int, width: int):
    if _alias_poison(cfg):
        refs = refs[1:]  # the NaN-filled buffer aliased to the output; never read
    out_ref, m_s, z_s, m_t, z_t, acc, d_acc, c_acc = refs
    alpha, tau = cfg.alpha, cfg.temperature
    endpoint = jsd_math.is_endpoint(alpha)
    p, k = pl.program_id(1), pl.program_id(2)
    last_pass = 0 if endpoint else 1
    last_block = pl.num_programs(2) - 1

    def state():
        return jsd_math.Online(_read(m_s), _read(z_s), _read(m_t), _read(z_t), _read(acc))

    @pl.when((p == 0) & (k == 0))
    def _init():
        _write(m_s, jnp.float32(jsd_math.NEG_INF))
        _write(m_t, jnp.float32(jsd_math.NEG_INF))
        for ref in (z_s, z_t, acc, d_acc, c_acc):
            _write(ref, jnp.float32(0.0))

    @pl.when(p == 0)
    def _online():
        s = _load(s_ref, k, width, vocab)
        t = _load(t_ref, k, width, vocab)
        new = jsd_math.online_update(state(), s, t, alpha=alpha, tau=tau)
        for ref, value in zip((m_s, z_s, m_t, z_t, acc), new):
            _write(ref, value)

    if not endpoint:

        @pl.when(p == 1)
        def _mixture():
            s = _load(s_ref, k, width, vocab)
            t = _load(t_ref, k, width, vocab)
            stats = jsd_math.row_stats(state())
            d, c = jsd_math.mixture_terms(stats, s, t, alpha=alpha, tau=tau)
            _write(d_acc, _read(d_acc) + d)
            _write(c_acc, _read(c_acc) + c)

    @pl.when((p == last_pass) & (k == last_block))
    def _finish():
        final = state()
        stats = jsd_math.row_stats(final)
        if endpoint:
            div = jsd_math.endpoint_divergence(final, stats, alpha=alpha)
            c = div
        else:
            div, c = _read(d_acc), _read(c_acc)
        out_ref[...] = _pack(
            out_ref.shape,
            m_s=stats.m_s,
            lz_s=stats.lz_s,
            m_t=stats.m_t,
            lz_t=stats.lz_t,
            c=c,
            div=div,
        )


def forward(student, teacher, cfg: Static):
    """(divergence [N] float32, row data [N, 128]) via one pallas_call."""
    rows, vocab = student.shape
    block_rows, width = _tiles(rows, vocab, cfg)
    passes = 1 if jsd_math.is_endpoint(cfg.alpha) else 2
    grid = (pl.cdiv(rows, block_rows), passes, pl.cdiv(vocab, width))
    tile = pl.BlockSpec((block_rows, width), lambda i, p, k: (i, k))
    row_tile = pl.BlockSpec((block_rows, LANES), lambda i, p, k: (i, 0))
    out_shape = jax.ShapeDtypeStruct((rows, LANES), jnp.float32)
    inputs, in_specs, aliases = [student, teacher], [tile, tile], {}
    if _alias_poison(cfg):
        inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs.append(row_tile)
        aliases = {2: 0}
    row_data = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, vocab=vocab, width=width),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=row_tile,
        scratch_shapes=[pltpu.VMEM((block_rows, LANES), jnp.float32) for _ in range(7)],
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=_interpret(cfg),
        name="jsd_forward",
    )(*inputs)
    return row_data[:, LANE["div"]], row_data


def _backward_kernel(s_ref, t_ref, row_ref, *refs, cfg: Static, vocab: int, width: int):
    ds_ref = refs[-1]
    k = pl.program_id(1)
    row = row_ref[...]

    def lane(name):
        return row[:, LANE[name] : LANE[name] + 1]

    stats = jsd_math.RowStats(lane("m_s"), lane("lz_s"), lane("m_t"), lane("lz_t"))
    s = _load(s_ref, k, width, vocab)
    t = _load(t_ref, k, width, vocab)
    g = jsd_math.student_grad(stats, lane("c"), s, t, alpha=cfg.alpha, tau=cfg.temperature)
    # Select, not multiply: a masked row's statistics may be NaN.
    ds_ref[...] = jnp.where(lane("valid") > 0, lane("coef") * g, 0.0).astype(ds_ref.dtype)


def backward(student, teacher, row_data, coef, valid, cfg: Static):
    """∂(Σ ct·D)/∂student ``[N, V]`` in the student's dtype; ``coef`` = ct·valid/τ."""
    rows, vocab = student.shape
    block_rows, width = _tiles(rows, vocab, cfg)
    row_data = row_data.at[:, LANE["coef"]].set(coef).at[:, LANE["valid"]].set(valid)
    tile = pl.BlockSpec((block_rows, width), lambda i, k: (i, k))
    row_tile = pl.BlockSpec((block_rows, LANES), lambda i, k: (i, 0))
    out_shape = jax.ShapeDtypeStruct(student.shape, student.dtype)
    inputs, in_specs, aliases = [student, teacher, row_data], [tile, tile, row_tile], {}
    if _alias_poison(cfg):
        inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        in_specs.append(tile)
        aliases = {3: 0}
    return pl.pallas_call(
        functools.partial(_backward_kernel, cfg=cfg, vocab=vocab, width=width),
        out_shape=out_shape,
        grid=(pl.cdiv(rows, block_rows), pl.cdiv(vocab, width)),
        in_specs=in_specs,
        out_specs=tile,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret(cfg),
        name="jsd_backward",
    )(*inputs)
