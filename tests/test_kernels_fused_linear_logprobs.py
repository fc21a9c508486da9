"""kernels.fused_linear_logprobs: token logprobs, entropy and argmax hit from hidden states.

Compared with float64 NumPy (kernels.reference_linear) and the dense jnp formula, over shapes
that hit the block edges: V not a multiple of the block (the clamped last block overlaps its
predecessor, where a double-counted ∂h or a stale ∂W column would show), V smaller than one
block, N = 1. The ∂W buffer is NaN-poisoned, so a column block the backward never writes fails.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference_linear

# name: (N, D, V, block_vocab)
SHAPES = {
    "ragged": (10, 16, 300, 128),
    "exact": (6, 16, 256, 128),
    "single_block": (7, 8, 64, 128),
    "one_row": (1, 16, 300, 128),
    "many_blocks": (5, 8, 50, 7),
}
# (logp atol, entropy atol, gradient tolerance relative to max |reference gradient|). The
# reference sees the same rounded inputs; the logits are float32-accumulated either way, so
# bfloat16 only adds the rounding of the returned gradients (8 bits of mantissa).
TOLERANCES = {
    jnp.float32: (2e-5, 2e-5, 2e-5),
    jnp.bfloat16: (2e-5, 2e-5, 1e-2),
}


@pytest.fixture(autouse=True)
def _poison_outputs():
    kernels.set_poison_outputs(True)
    yield
    kernels.set_poison_outputs(False)


def _inputs(n, d, v, seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(np.float32)
    y = rng.integers(0, v, size=n).astype(np.int32)
    return h, w, y


def _mask_with_garbage(h):
    """A mask dropping rows 1 and 2 (when present), whose hidden states become NaN and inf."""
    n = h.shape[0]
    if n < 3:
        return h, None
    mask = np.ones(n, bool)
    mask[[1, 2]] = False
    h = h.copy()
    h[1] = np.nan
    h[2] = np.inf
    return h, mask


def _as64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_float64_reference(shape, dtype, temperature):
    n, d, v, block = SHAPES[shape]
    h, w, y = _inputs(n, d, v)
    h, mask = _mask_with_garbage(h)
    h_in, w_in = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
    ct = np.random.default_rng(1).uniform(0.5, 2.0, size=n).astype(np.float32)
    blocks = kernels.BlockSizes(block_vocab=block)
    kw = dict(temperature=temperature, mask=mask)

    def loss(h_, w_):
        out = kernels.fused_linear_logprobs(h_, w_, y, block_sizes=blocks, with_entropy=True,
                                            with_argmax=True, **kw)  # fmt: skip
        return (out.logp * ct).sum(), out

    (_, out), (gh, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h_in, w_in)
    want = reference_linear.token_logprobs(_as64(h_in), _as64(w_in), y, cotangent=ct, **kw)
    atol, ent_atol, grad_tol = TOLERANCES[dtype]
    assert out.logp.dtype == jnp.float32 and out.entropy.dtype == jnp.float32
    assert gh.dtype == dtype and gw.dtype == dtype
    np.testing.assert_allclose(np.asarray(out.logp), want["logp"], rtol=2e-5, atol=atol)
    np.testing.assert_allclose(np.asarray(out.entropy), want["entropy"], rtol=2e-5, atol=ent_atol)
    np.testing.assert_array_equal(np.asarray(out.is_argmax), want["is_argmax"])
    for got, ref in ((gh, want["d_hidden"]), (gw, want["d_head"])):
        got = np.asarray(got.astype(jnp.float32))
        np.testing.assert_allclose(got, ref, atol=grad_tol * np.abs(ref).max())


@pytest.mark.parametrize("layout", ["DV", "VD"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_gradient_matches_float64_reference(temperature, layout):
    """entropy_grad: ∂(Σ c·logp + Σ c_H·H) against the float64 formula, masked garbage rows 0."""
    n, d, v, block = SHAPES["ragged"]
    h, w, y = _inputs(n, d, v, seed=5)
    h, mask = _mask_with_garbage(h)
    rng = np.random.default_rng(6)
    ct, ct_h = rng.uniform(0.5, 2.0, size=(2, n)).astype(np.float32)
    head = w if layout == "DV" else np.ascontiguousarray(w.T)

    def loss(h_, w_):
        out = kernels.fused_linear_logprobs(
            h_, w_, y, temperature=temperature, mask=mask, head_layout=layout,
            block_sizes=kernels.BlockSizes(block_vocab=block), entropy_grad=True)  # fmt: skip
        return (out.logp * ct).sum() + (out.entropy * ct_h).sum(), out

    (_, out), (gh, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(h), jnp.asarray(head))
    want = reference_linear.token_logprobs(_as64(h), _as64(w), y, temperature=temperature,
                                           mask=mask, cotangent=ct, entropy_cotangent=ct_h)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out.entropy), want["entropy"], rtol=2e-5, atol=2e-5)
    gw = np.asarray(gw) if layout == "DV" else np.asarray(gw).T
    for got, ref in ((np.asarray(gh), want["d_hidden"]), (gw, want["d_head"])):
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())
    # and against autodiff of the dense formula
    def dense(h_, w_):
        out = kernels.fused_linear_logprobs_reference(h_, w_, y, temperature=temperature,
                                                      mask=mask, entropy_grad=True)  # fmt: skip
        return (out.logp * ct).sum() + (out.entropy * ct_h).sum()

    dh = jax.grad(dense)(jnp.where(mask[:, None], jnp.asarray(h), 0.0), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(gh), np.asarray(dh), atol=1e-4 * np.abs(dh).max())


@pytest.mark.parametrize(
    ("shape", "jit"), [("ragged", True), ("single_block", True), ("ragged", False)]
)
def test_matches_dense_jnp_formula(shape, jit):
    n, d, v, block = SHAPES[shape]
    h, w, y = _inputs(n, d, v, seed=2)
    kw = dict(temperature=1.3, mask=np.arange(n) % 4 != 3)

    def fused(h_, w_):
        out = kernels.fused_linear_logprobs(h_, w_, y, block_sizes=kernels.BlockSizes(
            block_vocab=block), with_entropy=True, with_argmax=True, **kw)  # fmt: skip
        return -out.logp.mean(), out

    def dense(h_, w_):
        out = kernels.fused_linear_logprobs_reference(h_, w_, y, **kw)
        return -out.logp.mean(), out

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    if jit:
        grad = lambda f, g=grad: jax.jit(g(f))
    (value, out), grads = grad(fused)(h, w)
    (want_value, want_out), want_grads = grad(dense)(h, w)
    chex.assert_trees_all_close(value, want_value, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(out.logp, want_out.logp, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(out.entropy, want_out.entropy, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(out.is_argmax, want_out.is_argmax)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["transpose", "VD"])
def test_tied_embedding(layout):
    """head = embedding.T, or the table itself with head_layout="VD": same values, ∂ embedding."""
    n, d, v, block = SHAPES["ragged"]
    h, w, y = _inputs(n, d, v, seed=3)
    table = np.ascontiguousarray(w.T)  # [V, D]
    blocks = kernels.BlockSizes(block_vocab=block)

    def loss(h_, table_):
        if layout == "VD":
            out = kernels.fused_linear_logprobs(h_, table_, y, head_layout="VD", block_sizes=blocks)
        else:
            out = kernels.fused_linear_logprobs(h_, table_.T, y, block_sizes=blocks)
        return out.logp.sum(), out.logp

    (_, logp), (gh, g_table) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(h, table)
    want = reference_linear.token_logprobs(h, w, y)
    assert g_table.shape == (v, d)
    np.testing.assert_allclose(np.asarray(logp), want["logp"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(gh), want["d_hidden"], atol=2e-5 * 10)
    np.testing.assert_allclose(np.asarray(g_table), want["d_head"].T, atol=2e-5 * 10)


@pytest.mark.parametrize("hidden_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_compute_dtype_casts_per_block(hidden_dtype):
    """A float32 head read in bfloat16: the logits of the rounded operands, ∂ in input dtypes."""
    n, d, v, block = SHAPES["ragged"]
    h, w, y = _inputs(n, d, v, seed=8)
    h_in = jnp.asarray(h, hidden_dtype)
    blocks = kernels.BlockSizes(block_vocab=block)

    def loss(h_, w_):
        out = kernels.fused_linear_logprobs(h_, w_, y, compute_dtype=jnp.bfloat16,
                                            block_sizes=blocks)  # fmt: skip
        return out.logp.sum(), out.logp

    (_, logp), (gh, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h_in, w)
    assert gh.dtype == hidden_dtype and gw.dtype == jnp.float32
    rounded = lambda x: _as64(jnp.asarray(x, jnp.bfloat16))
    want = reference_linear.token_logprobs(rounded(h_in), rounded(w), y)
    np.testing.assert_allclose(np.asarray(logp), want["logp"], rtol=2e-5, atol=2e-5)
    # G is rounded to bfloat16 before the backward matmuls (float32 accumulation).
    for got, ref in ((gh, want["d_hidden"]), (gw, want["d_head"])):
        got = np.asarray(jnp.asarray(got, jnp.float32))
        np.testing.assert_allclose(got, ref, atol=1e-2 * np.abs(ref).max())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_masked_rows_give_exact_zeros(jit):
    n, d, v, block = SHAPES["ragged"]
    h, w, y = _inputs(n, d, v, seed=4)
    mask = np.ones(n, bool)
    mask[[0, 4, 9]] = False
    h[0], h[4], h[9] = np.nan, np.inf, -np.inf
    y[4] = -1  # a masked row's target is never looked at

    def f(h_, w_):
        out = kernels.fused_linear_logprobs(h_, w_, y, mask=mask, with_entropy=True,
                                            with_argmax=True, block_sizes=kernels.BlockSizes(
                                                block_vocab=block))  # fmt: skip
        return out.logp.sum(), out

    f = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    (value, out), (gh, gw) = (jax.jit(f) if jit else f)(h, w)
    assert np.isfinite(float(value))
    assert np.all(np.asarray(out.logp)[~mask] == 0) and np.all(np.asarray(out.entropy)[~mask] == 0)
    assert not np.asarray(out.is_argmax)[~mask].any()
    assert np.all(np.asarray(gh)[~mask] == 0)
    chex.assert_tree_all_finite((out.logp, out.entropy, gh, gw))
    # ∂W sees only the valid rows: equal to the gradient of the valid rows alone.
    sub = kernels.fused_linear_logprobs(h[mask], w, y[mask], block_sizes=kernels.BlockSizes(
        block_vocab=block))  # fmt: skip
    g_sub = jax.grad(lambda w_: kernels.fused_linear_logprobs(
        h[mask], w_, y[mask]).logp.sum())(w)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out.logp)[mask], np.asarray(sub.logp), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(g_sub), rtol=1e-5, atol=1e-6)


def test_probabilities_sum_to_one_and_bounds():
    """Σ_y exp(logp(y)) = 1, logp ≤ 0, 0 ≤ H ≤ log V (= log V for a uniform row, ≈ 0 peaked)."""
    n, d, v = 4, 8, 37
    h, w, _ = _inputs(n, d, v, seed=5)
    h[1] = 0.0  # uniform: H = log V exactly
    h[2] *= 200.0  # nearly one-hot: H ≈ 0
    rows = np.repeat(h, v, axis=0)  # every (row, target) pair
    targets = np.tile(np.arange(v, dtype=np.int32), n)
    out = kernels.fused_linear_logprobs(rows, w, targets, with_entropy=True, temperature=0.9,
                                        block_sizes=kernels.BlockSizes(block_vocab=16))  # fmt: skip
    logp = np.asarray(out.logp).reshape(n, v)
    entropy = np.asarray(out.entropy).reshape(n, v)
    assert np.all(logp <= 0)
    np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(-1), 1.0, rtol=1e-5)
    assert np.all(entropy >= 0) and np.all(entropy <= math.log(v))
    np.testing.assert_allclose(entropy[1], math.log(v), rtol=1e-6)
    assert entropy[2].max() < 1e-3


def test_argmax_flag_and_extras_are_constants():
    n, d, v, block = SHAPES["ragged"]
    h, w, y = _inputs(n, d, v, seed=6)
    best = (h.astype(np.float64) @ w).argmax(-1)
    y[::2] = best[::2]  # half the rows hit
    blocks = kernels.BlockSizes(block_vocab=block)

    def f(h_, field):
        out = kernels.fused_linear_logprobs(h_, w, y, block_sizes=blocks, with_entropy=True,
                                            with_argmax=True)  # fmt: skip
        return out.logp.sum() if field == "logp" else out.entropy.sum()

    out = kernels.fused_linear_logprobs(h, w, y, with_argmax=True, block_sizes=blocks)
    np.testing.assert_array_equal(np.asarray(out.is_argmax), best == y)
    assert out.entropy is None and out.is_argmax.dtype == jnp.bool_
    assert np.all(np.asarray(jax.grad(f)(h, "entropy")) == 0)
    plain = jax.grad(lambda h_: kernels.fused_linear_logprobs(h_, w, y, block_sizes=blocks)
                     .logp.sum())(h)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(h, "logp")), np.asarray(plain))


def test_out_of_range_target_under_jit_is_nan():
    n, d, v, _ = SHAPES["ragged"]
    h, w, y = _inputs(n, d, v, seed=7)
    y[3] = v
    f = jax.jit(jax.value_and_grad(
        lambda h_, y_: kernels.fused_linear_logprobs(h_, w, y_).logp.sum()))  # fmt: skip
    value, grad = f(h, y)
    assert np.isnan(float(value)) and np.isnan(np.asarray(grad)).any()
    logp = jax.jit(lambda y_: kernels.fused_linear_logprobs(h, w, y_).logp)(y)
    assert np.isnan(np.asarray(logp)[3]) and np.isfinite(np.delete(np.asarray(logp), 3)).all()


H, W, Y = np.zeros((4, 8), np.float32), np.zeros((8, 20), np.float32), np.zeros(4, np.int32)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((H[0], W, Y), {}, r"hidden must be \[N, D\]"),
        ((H, W[None], Y), {}, "head must be 2-D"),
        ((H, W[:7], Y), {}, r"must be \[D, V\].*D = 8"),
        ((H, W, Y), {"head_layout": "VD"}, r"must be \[V, D\].*D = 8"),
        ((H, W, Y), {"head_layout": "dv"}, "head_layout must be one of"),
        ((H, W, Y[:3]), {}, r"targets must have shape \[N\] = \(4,\)"),
        ((H, W, Y[:, None]), {}, r"targets must have shape \[N\]"),
        ((H, W, Y.astype(np.float32)), {}, "targets must be integer"),
        ((H, W, Y + 20), {}, r"\[0, 20\).*row 0 has 20"),
        ((H, W, Y - 1), {}, "row 0 has -1"),
        ((H.astype(np.int32), W, Y), {}, "hidden must be floating"),
        ((H, W, Y), {"temperature": 0.0}, "temperature"),
        ((H, W, Y), {"mask": np.ones(3)}, "mask must have shape"),
        ((H, W, Y), {"with_entropy": 1}, "with_entropy must be a bool"),
        ((H, W, Y), {"block_sizes": 128}, "block_sizes must be a kernels.BlockSizes"),
        ((H, W, Y), {"compute_dtype": jnp.int8}, "compute_dtype must be a floating dtype"),
        ((H, W, Y), {"compute_dtype": "fp99"}, "compute_dtype must be a floating dtype"),
    ],
)
def test_validation_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernels.fused_linear_logprobs(*args, **kwargs)


def test_out_of_range_target_in_masked_row_is_accepted():
    y = np.array([0, -1, 25, 3], np.int32)
    out = kernels.fused_linear_logprobs(H, W, y, mask=np.array([1, 0, 0, 1], bool))
    np.testing.assert_allclose(np.asarray(out.logp), [-math.log(20), 0, 0, -math.log(20)],
                               rtol=1e-6)  # fmt: skip


@pytest.mark.accelerator
class TestCompiled:
    """The same checks compiled for a GPU or TPU (skipped on CPU), run by
    `JAXPOST_TEST_BACKEND=accelerator pytest -m accelerator`. Float32 matmuls run at full
    precision ("highest"): the backends' defaults (TF32, bfloat16 passes) would measure the
    matmul unit, not the op."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("shape", ["ragged", "single_block", "one_row"])
    def test_matches_float64_reference(self, shape, dtype):
        with jax.default_matmul_precision("highest"):
            test_matches_float64_reference(shape, dtype, 0.7)

    @pytest.mark.parametrize("layout", ["transpose", "VD"])
    def test_tied_embedding(self, layout):
        with jax.default_matmul_precision("highest"):
            test_tied_embedding(layout)

    def test_masked_rows_give_exact_zeros(self):
        with jax.default_matmul_precision("highest"):
            test_masked_rows_give_exact_zeros(jit=True)
