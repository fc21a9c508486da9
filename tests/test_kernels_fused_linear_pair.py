"""kernels.fused_linear_kl_pair: both KLs and the teacher entropy in one sweep.

Against float64 NumPy (kernels.reference_linear), against two fused_linear_jsd calls, and as
entropy-aware OPD against jaxpost.opd.entropy_aware_opd_kl on materialized logits. V = 300 with
128-column blocks exercises the clamped, overlapping last block; ∂W is NaN-poisoned.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference, reference_linear

N, D, DT, V = 10, 16, 12, 300
BLOCKS = kernels.BlockSizes(block_vocab=128)


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


def _teacher(kind, th, tw):
    """(teacher argument, teacher_head_layout) for a kind of teacher input."""
    if kind == "logits":
        return (th.astype(np.float64) @ tw).astype(np.float32), "DV"
    if kind == "pair_VD":
        return (th, np.ascontiguousarray(tw.T)), "VD"
    return (th, tw), "DV"


@pytest.mark.parametrize("head_layout", ["DV", "VD"])
@pytest.mark.parametrize("teacher_kind", ["logits", "pair", "pair_VD"])
def test_matches_float64_reference(teacher_kind, head_layout):
    h, w, th, tw = _inputs()
    teacher, t_layout = _teacher(teacher_kind, th, tw)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    h[2], h[6] = np.nan, -np.inf  # masked garbage reaches neither output nor gradients
    rng = np.random.default_rng(1)
    c_r, c_f = (rng.uniform(0.2, 2.0, size=N).astype(np.float32) for _ in range(2))
    head = w if head_layout == "DV" else np.ascontiguousarray(w.T)
    kw = dict(temperature=0.8, mask=mask)

    def loss(h_, w_):
        out = kernels.fused_linear_kl_pair(h_, w_, teacher, block_sizes=BLOCKS,
                                           head_layout=head_layout, teacher_head_layout=t_layout,
                                           **kw)  # fmt: skip
        return (c_r * out.reverse_kl + c_f * out.forward_kl).sum(), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), (gh, g_head) = step(h, head)
    t_logits = th.astype(np.float64) @ tw.astype(np.float64)
    want = reference_linear.kl_pair(h, w, t_logits, cotangents=(c_r, c_f), **kw)
    for name in ("reverse_kl", "forward_kl", "teacher_entropy"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), want[name], rtol=1e-4,
                                   atol=1e-5, err_msg=name)  # fmt: skip
    g_w = np.asarray(g_head) if head_layout == "DV" else np.asarray(g_head).T
    np.testing.assert_allclose(np.asarray(gh), want["d_hidden"],
                               atol=1e-4 * np.abs(want["d_hidden"]).max())  # fmt: skip
    np.testing.assert_allclose(g_w, want["d_head"], atol=1e-4 * np.abs(want["d_head"]).max())
    assert np.all(np.asarray(gh)[~mask] == 0)
    assert np.all(np.asarray(out.teacher_entropy)[~mask] == 0)


def test_teacher_without_support_somewhere():
    """Teacher logits −inf on some entries: KL(p_S ‖ p_T) = +inf there, the rest stays exact.

    A loss that weighs the reverse KL by 0 on such rows still gets a finite gradient.
    """
    h, w, th, tw = _inputs(seed=5)
    t = (th.astype(np.float64) @ tw).astype(np.float32)
    rng = np.random.default_rng(6)
    cut = np.array([0, 3, 7])
    t[cut[:, None], rng.integers(0, V, size=(3, 40))] = -np.inf
    c_f = rng.uniform(0.5, 2.0, size=N).astype(np.float32)

    def loss(h_, w_):
        out = kernels.fused_linear_kl_pair(h_, w_, t, block_sizes=BLOCKS, temperature=0.9)
        return (c_f * out.forward_kl).sum(), out

    (_, out), (gh, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
    with np.errstate(invalid="ignore"):  # the reference's reverse-KL gradient is NaN there
        want = reference_linear.kl_pair(h, w, t, temperature=0.9)
    rev = np.asarray(out.reverse_kl)
    assert np.all(np.isposinf(rev[cut])) and np.isfinite(np.delete(rev, cut)).all()
    np.testing.assert_allclose(np.delete(rev, cut), np.delete(want["reverse_kl"], cut), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.forward_kl), want["forward_kl"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.teacher_entropy), want["teacher_entropy"],
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    _, want_gh, want_gw = reference.fused_linear_jsd(h, w, t, alpha=0.0, temperature=0.9,
                                                     cotangent=c_f)  # fmt: skip
    chex.assert_tree_all_finite((gh, gw))
    np.testing.assert_allclose(np.asarray(gh), want_gh, atol=1e-4 * np.abs(want_gh).max())
    np.testing.assert_allclose(np.asarray(gw), want_gw, atol=1e-4 * np.abs(want_gw).max())


@pytest.mark.parametrize("op", ["kl_pair", "jsd"])
def test_compute_dtype_reads_float32_heads_in_bfloat16(op):
    """compute_dtype=bfloat16 on float32 inputs = the float32 op on bfloat16-rounded operands."""
    h, w, th, tw = _inputs(seed=7)
    rnd = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))

    def loss(h_, w_, teacher, **kw):
        if op == "jsd":
            return kernels.fused_linear_jsd(h_, w_, teacher, alpha=1.0, block_sizes=BLOCKS, **kw)
        return kernels.fused_linear_kl_pair(h_, w_, teacher, block_sizes=BLOCKS, **kw).forward_kl

    f = lambda h_, w_, t, **kw: jax.value_and_grad(lambda a, b: loss(a, b, t, **kw).sum(),
                                                   argnums=(0, 1))(h_, w_)  # fmt: skip
    value, (gh, gw) = f(h, w, (th, tw), compute_dtype="bfloat16")
    want, (want_gh, want_gw) = f(rnd(h), rnd(w), (rnd(th), rnd(tw)))
    assert gh.dtype == jnp.float32 and gw.dtype == jnp.float32
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    np.testing.assert_allclose(gh, want_gh, atol=1e-2 * np.abs(want_gh).max())
    np.testing.assert_allclose(gw, want_gw, atol=1e-2 * np.abs(want_gw).max())


def test_equals_two_fused_linear_jsd_calls():
    """Same values and gradients as the two-call formulation it replaces (α = 1 and α = 0)."""
    h, w, th, tw = _inputs(seed=2)
    teacher = (th, tw)
    weight = np.random.default_rng(3).uniform(size=N).astype(np.float32)

    def pair(h_, w_):
        out = kernels.fused_linear_kl_pair(h_, w_, teacher, block_sizes=BLOCKS)
        return ((1 - weight) * out.reverse_kl + weight * out.forward_kl).sum()

    def two_calls(h_, w_):
        kl = lambda a: kernels.fused_linear_jsd(h_, w_, teacher, alpha=a, block_sizes=BLOCKS)
        return ((1 - weight) * kl(1.0) + weight * kl(0.0)).sum()

    got = jax.jit(jax.value_and_grad(pair, argnums=(0, 1)))(h, w)
    want = jax.jit(jax.value_and_grad(two_calls, argnums=(0, 1)))(h, w)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_entropy_aware_opd_equals_dense_loss():
    """The wiring the training step needs: w = H(p_T)/log V, (1 − w)·reverse + w·forward."""
    from jaxpost import opd

    h, w, th, tw = _inputs(seed=4)
    mask = np.array([1, 1, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    t_logits = (th.astype(np.float64) @ tw).astype(np.float32)

    def fused(h_, w_):
        kl = kernels.fused_linear_kl_pair(h_, w_, (th, tw), mask=mask, block_sizes=BLOCKS)
        weight = jnp.clip(kl.teacher_entropy / math.log(V), 0.0, 1.0)
        per_token = (1 - weight) * kl.reverse_kl + weight * kl.forward_kl
        return per_token.sum() / mask.sum()

    def dense(h_, w_):
        logits = (h_ @ w_).reshape(2, 5, V)
        loss, _ = opd.entropy_aware_opd_kl()(logits, t_logits.reshape(2, 5, V), mask.reshape(2, 5))
        return loss

    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
    want = jax.jit(jax.value_and_grad(dense, argnums=(0, 1)))(h, w)
    chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-6)


H, W, TL = np.zeros((4, 8), np.float32), np.zeros((8, 20), np.float32), np.zeros((4, 20))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((H, W, TL[:, :19]), {}, "vocabulary mismatch"),
        ((H, W, TL[:3]), {}, "logits must be"),
        ((H, W.T, TL), {}, r"student_head \(20, 8\) must be \[D, V\]"),
        ((H, W, TL), {"head_layout": "VD"}, r"must be \[V, D\] \(head_layout='VD'\)"),
        ((H, W, (H, W)), {"teacher_head_layout": "VD"}, r"teacher_head \(8, 20\) must be \[V, D\]"),
        ((H, W, (H, W)), {"teacher_head_layout": "x"}, "teacher_head_layout must be one of"),
        ((H, W, (H[:3], W)), {}, "teacher_hidden has 3 rows"),
        ((H, W, TL), {"temperature": -1.0}, "temperature"),
    ],
)
def test_validation_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.fused_linear_kl_pair(*args, **kwargs)


@pytest.mark.accelerator
class TestCompiled:
    """The reference grid compiled for a GPU or TPU (skipped on CPU), float32 matmuls at full
    precision; see tests/test_kernels_fused_linear_logprobs.py."""

    @pytest.mark.parametrize("head_layout", ["DV", "VD"])
    @pytest.mark.parametrize("teacher_kind", ["logits", "pair_VD"])
    def test_matches_float64_reference(self, teacher_kind, head_layout):
        with jax.default_matmul_precision("highest"):
            test_matches_float64_reference(teacher_kind, head_layout)

    def test_teacher_without_support_somewhere(self):
        with jax.default_matmul_precision("highest"):
            test_teacher_without_support_somewhere()
