"""Top-k teachers (kernels.fused_linear_topk) against float64 NumPy: the teacher's k tokens, their
log-probabilities and the tail bucket; the student's buckets and the gradient of D_α over them
(against autodiff of the dense formula); k = V recovers the full-vocabulary divergence; and no
[N, V] array in the fused program."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference

# (rows, width, vocab, block): several blocks with a clamped, overlapping last one; one block
SHAPES = {"ragged": (9, 16, 203, 64), "single_block": (5, 8, 48, 4096)}


def _inputs(n, d, v, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 0.6).astype(np.float32)
    return h, w


def _log_softmax64(x, tau=1.0):
    x = np.asarray(x, np.float64) / tau
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("layout", ["DV", "VD"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_teacher_topk_matches_float64(shape, layout):
    n, d, v, block = SHAPES[shape]
    h, w = _inputs(n, d, v)
    mask = np.arange(n) % 4 != 3
    k, tau = 7, 0.8
    head = w if layout == "DV" else np.ascontiguousarray(w.T)
    out = jax.jit(lambda h_, w_: kernels.fused_linear_topk(
        h_, w_, k, temperature=tau, mask=mask, head_layout=layout,
        block_sizes=kernels.BlockSizes(block_vocab=block)))(h, head)  # fmt: skip
    lp = _log_softmax64(h.astype(np.float64) @ w, tau)
    order = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
    for r in range(n):
        if not mask[r]:
            assert np.all(np.asarray(out.idx[r]) == 0) and float(out.log_tail[r]) == 0
            continue
        np.testing.assert_array_equal(np.asarray(out.idx[r]), order[r])
        np.testing.assert_allclose(np.asarray(out.logp[r]), lp[r, order[r]], atol=2e-5)
        rest = np.delete(lp[r], order[r])
        np.testing.assert_allclose(float(out.log_tail[r]), np.log(np.exp(rest).sum()), atol=2e-5)
    dense = kernels.topk_from_logits(jnp.asarray(h @ w), k, temperature=tau)
    np.testing.assert_array_equal(np.asarray(dense.idx)[mask], np.asarray(out.idx)[mask])
    np.testing.assert_allclose(np.asarray(dense.log_tail)[mask], np.asarray(out.log_tail)[mask],
                               atol=2e-5)  # fmt: skip


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_student_buckets_and_divergence_gradient(shape, alpha):
    n, d, v, block = SHAPES[shape]
    h, w = _inputs(n, d, v, seed=1)
    th, tw = _inputs(n, d, v, seed=2)
    mask = np.arange(n) % 3 != 1
    k, tau = 5, 1.3
    blocks = kernels.BlockSizes(block_vocab=block)
    teacher = kernels.fused_linear_topk(th, tw, k, temperature=tau, mask=mask, block_sizes=blocks)
    ct = np.random.default_rng(3).uniform(0.5, 2.0, n).astype(np.float32) * mask

    def fused(h_, w_):
        s = kernels.fused_linear_bucket_logprobs(h_, w_, teacher.idx, temperature=tau, mask=mask,
                                                 block_sizes=blocks)  # fmt: skip
        return (kernels.bucket_divergence(s, teacher.buckets(), alpha) * ct).sum(), s

    def dense(h_, w_):
        s = kernels.bucket_logprobs_from_logits(h_ @ w_, teacher.idx, temperature=tau)
        return (kernels.bucket_divergence(s, teacher.buckets(), alpha) * ct).sum(), s

    (value, buckets), grads = jax.jit(jax.value_and_grad(fused, (0, 1), has_aux=True))(h, w)
    (want_value, _), want_grads = jax.value_and_grad(dense, (0, 1), has_aux=True)(h, w)
    lp = _log_softmax64(h.astype(np.float64) @ w, tau)
    idx = np.asarray(teacher.idx)
    for r in np.flatnonzero(mask):
        np.testing.assert_allclose(np.asarray(buckets[r, :k]), lp[r, idx[r]], atol=2e-5)
        rest = np.log(np.exp(np.delete(lp[r], idx[r])).sum())
        np.testing.assert_allclose(float(buckets[r, k]), rest, atol=2e-5)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                   atol=2e-5 * float(jnp.abs(want).max()))  # fmt: skip
    assert float(jnp.abs(grads[0]).max()) > 0


def test_k_equal_to_the_vocabulary_is_the_full_divergence():
    n, d, v = 6, 8, 40
    h, w = _inputs(n, d, v, seed=4)
    th, tw = _inputs(n, d, v, seed=5)
    teacher = kernels.fused_linear_topk(th, tw, v)
    assert np.all(np.isneginf(np.asarray(teacher.log_tail)))  # no mass left outside
    student = kernels.fused_linear_bucket_logprobs(h, w, teacher.idx)
    for alpha in (0.0, 0.5, 1.0):
        got = kernels.bucket_divergence(student, teacher.buckets(), alpha)
        want = reference.generalized_jsd(h @ w, th @ tw, alpha=alpha)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    g = jax.grad(lambda x: kernels.bucket_divergence(
        kernels.fused_linear_bucket_logprobs(x, w, teacher.idx), teacher.buckets(), 1.0).sum())(h)
    chex.assert_tree_all_finite(g)


def test_fused_program_holds_no_vocabulary_sized_array():
    n, d, v = 16, 8, 5000
    h, w = _inputs(n, d, v, seed=6)
    k = 8

    def loss(h_, w_):
        t = kernels.fused_linear_topk(h_, w_, k)
        s = kernels.fused_linear_bucket_logprobs(h_, w_, t.idx)
        return kernels.bucket_divergence(s, t.buckets(), 1.0).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(h, w).jaxpr
    shapes = set()

    def walk(j):
        for eqn in j.eqns:
            for var in eqn.outvars:
                if hasattr(var.aval, "shape"):
                    shapes.add(var.aval.shape)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr)
    assert not any(v in s and s not in ((d, v), (v, d)) for s in shapes), shapes


def test_bad_input_is_refused():
    h, w = _inputs(4, 8, 32)
    for k in (0, 33, 2.0):
        with pytest.raises(ValueError, match="k must be an int"):
            kernels.fused_linear_topk(h, w, k)
    with pytest.raises(ValueError, match="idx must be"):
        kernels.fused_linear_bucket_logprobs(h, w, np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="alpha"):
        kernels.bucket_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3)), 1.5)
