"""kernels.fused_linear_jsd: divergence and gradients (hidden, head) against float64 NumPy.

Heads come as [D, V] weights or, with head_layout="VD", as a tied model's [V, D] table.

V = 300 with 128-column blocks: the last block is clamped and overlaps its predecessor, which
is exactly where a double-counted ∂h or a stale ∂W column would show. The ∂W buffer is
NaN-poisoned, so a column block the backward never writes fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference

N, D, DT, V = 10, 16, 12, 300
BLOCKS = kernels.BlockSizes(block_rows=8, block_vocab=128)


@pytest.fixture(autouse=True)
def _poison_outputs():
    kernels.set_poison_outputs(True)
    yield
    kernels.set_poison_outputs(False)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) / np.sqrt(D) * 3).astype(np.float32)
    th = rng.normal(size=(N, DT)).astype(np.float32)
    tw = (rng.normal(size=(DT, V)) / np.sqrt(DT) * 3).astype(np.float32)
    return h, w, th, tw


@pytest.mark.parametrize("teacher_kind", ["logits", "pair"])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_matches_reference(alpha, teacher_kind):
    h, w, th, tw = _inputs()
    t_logits = th.astype(np.float64) @ tw.astype(np.float64)
    teacher = (th, tw) if teacher_kind == "pair" else t_logits.astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    h[2] = np.nan  # garbage in a masked row must reach neither output nor gradients
    ct = np.random.default_rng(1).uniform(0.5, 2.0, size=N).astype(np.float32)
    kw = dict(alpha=alpha, temperature=0.8, mask=mask)

    def loss(h_, w_):
        d = kernels.fused_linear_jsd(h_, w_, teacher, block_sizes=BLOCKS, **kw)
        return (d * ct).sum(), d

    (_, d), (gh, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, w)
    # The reference uses the same float32 teacher logits the kernel sees (or forms them in f64).
    t_ref = t_logits if teacher_kind == "pair" else teacher.astype(np.float64)
    want_d, want_gh, want_gw = reference.fused_linear_jsd(h, w, t_ref, cotangent=ct, **kw)
    np.testing.assert_allclose(np.asarray(d), want_d, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gh), want_gh, atol=1e-4 * np.abs(want_gh).max())
    np.testing.assert_allclose(np.asarray(gw), want_gw, atol=1e-4 * np.abs(want_gw).max())
    assert np.all(np.asarray(gh)[~mask] == 0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_embedding_layout_matches_reference(alpha):
    """head_layout="VD" (a tied model's [V, D] table) for student and teacher: same D and ∂."""
    h, w, th, tw = _inputs(seed=4)
    table, t_table = np.ascontiguousarray(w.T), np.ascontiguousarray(tw.T)
    mask = np.array([1, 0, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    h[8] = np.inf
    kw = dict(alpha=alpha, temperature=1.2, mask=mask)

    def loss(h_, table_):
        d = kernels.fused_linear_jsd(h_, table_, (th, t_table), block_sizes=BLOCKS,
                                     head_layout="VD", teacher_head_layout="VD", **kw)  # fmt: skip
        return d.sum(), d

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, d), (gh, g_table) = step(h, table)
    t_logits = th.astype(np.float64) @ tw.astype(np.float64)
    want_d, want_gh, want_gw = reference.fused_linear_jsd(h, w, t_logits, **kw)
    np.testing.assert_allclose(np.asarray(d), want_d, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gh), want_gh, atol=1e-4 * np.abs(want_gh).max())
    assert g_table.shape == (V, D)
    np.testing.assert_allclose(np.asarray(g_table).T, want_gw, atol=1e-4 * np.abs(want_gw).max())


def test_equals_generalized_jsd_on_materialized_logits():
    h, w, th, tw = _inputs(seed=2)
    teacher = th @ tw
    fused = kernels.fused_linear_jsd(h, w, teacher, alpha=0.5, block_sizes=BLOCKS)
    plain = kernels.generalized_jsd(h @ w, teacher, alpha=0.5, impl="xla")
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), rtol=1e-4, atol=1e-6)


def test_bfloat16_head_and_hidden():
    h, w, th, tw = _inputs(seed=3)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    teacher = th @ tw

    def loss(h_, w_):
        return kernels.fused_linear_jsd(h_, w_, teacher, alpha=1.0, block_sizes=BLOCKS).sum()

    value, (gh, gw) = jax.value_and_grad(loss, argnums=(0, 1))(hb, wb)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    h64 = np.asarray(hb.astype(jnp.float32), np.float64)
    w64 = np.asarray(wb.astype(jnp.float32), np.float64)
    want_d, want_gh, want_gw = reference.fused_linear_jsd(h64, w64, teacher, alpha=1.0)
    # Logits come from a bfloat16 matmul with float32 accumulation; gradients are rounded to bf16.
    np.testing.assert_allclose(float(value), want_d.sum(), rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(gh, np.float32), want_gh, atol=2e-2 * np.abs(want_gh).max()
    )
    np.testing.assert_allclose(
        np.asarray(gw, np.float32), want_gw, atol=2e-2 * np.abs(want_gw).max()
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((np.zeros((N, D)), np.zeros((D + 1, V)), np.zeros((N, V))), {}, r"must be \[D, V\]"),
        ((np.zeros((N, D)), np.zeros((D, V)), np.zeros((N, V + 1))), {}, "vocabulary mismatch"),
        ((np.zeros((N, D)), np.zeros((D, V)), np.zeros((N + 1, V))), {}, "logits must be"),
        (
            (np.zeros((N, D)), np.zeros((D, V)), (np.zeros((N, DT)), np.zeros((DT, V - 1)))),
            {},
            "vocabulary mismatch",
        ),
        ((np.zeros((N, D)), np.zeros((D, V)), np.zeros((N, V))), {"impl": "pallas_tpu"}, "impl"),
        ((np.zeros((N, D)), np.zeros((D, V)), np.zeros((N, V))), {"alpha": 2.0}, "alpha"),
        (
            (np.zeros((N, D)), np.zeros((D, V)), np.zeros((N, V))),
            {"head_layout": "VD"},
            r"student_head \(16, 300\) must be \[V, D\]",
        ),
        (
            (np.zeros((N, D)), np.zeros((D, V)), (np.zeros((N, DT)), np.zeros((DT, V)))),
            {"teacher_head_layout": "VD"},
            r"teacher_head \(12, 300\) must be \[V, D\]",
        ),
    ],
)
def test_validation_errors(args, kwargs, message):
    kwargs = {"alpha": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        kernels.fused_linear_jsd(*args, **kwargs)
