"""The references of the divergence: the float64 NumPy oracle, and the one dense `jnp` D_α.

kernels.reference (float64 NumPy) is the oracle every implementation is tested against; its
gradient is checked here by central differences. kernels.generalized_jsd_reference is the one
dense `jnp` implementation of D_α, and jaxpost.opd.generalized_jsd is that function.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from jaxpost import opd
from kernels import reference

ALPHAS = (0.0, 0.25, 0.5, 1.0)
N, V = 10, 33


def _logits(case: str, seed: int = 0):
    """(student, teacher, mask) float32: masked rows hold NaN/±inf garbage; shared −inf entries."""
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(N, V)) * 3).astype(np.float32)
    t = (rng.normal(size=(N, V)) * 3).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 0], bool)
    if case == "neg_inf":
        both = rng.random((N, V)) < 0.3
        both[:, 0] = False  # every row keeps some mass
        s[both] = t[both] = -np.inf
    s[1], s[4], t[9] = np.nan, np.inf, -np.inf
    return s, t, mask


@pytest.mark.parametrize("alpha", ALPHAS)
def test_numpy_reference_gradient_matches_finite_differences(alpha):
    """The float64 reference gradient, derived independently, checked by central differences."""
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    want = reference.generalized_jsd_grad(s, t, alpha=alpha, temperature=0.8)
    eps = 1e-6
    fd = np.zeros_like(s)
    for i in np.ndindex(s.shape):
        e = np.zeros_like(s)
        e[i] = eps
        up = reference.generalized_jsd(s + e, t, alpha=alpha, temperature=0.8).sum()
        down = reference.generalized_jsd(s - e, t, alpha=alpha, temperature=0.8).sum()
        fd[i] = (up - down) / (2 * eps)
    np.testing.assert_allclose(want, fd, atol=1e-8)


@pytest.mark.parametrize("case", ["plain", "neg_inf"])
def test_dense_jnp_reference_agrees_with_numpy_reference(case):
    s, t, mask = _logits(case)
    for alpha in ALPHAS:
        kw = dict(alpha=alpha, temperature=0.7, mask=mask)
        got = kernels.generalized_jsd_reference(s, t, **kw)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(got), reference.generalized_jsd(s, t, **kw), rtol=1e-5, atol=1e-5
        )
        g = jax.grad(lambda x, kw=kw: kernels.generalized_jsd_reference(x, t, **kw).sum())(s)
        want = reference.generalized_jsd_grad(s, t, **kw)
        np.testing.assert_allclose(np.asarray(g), want, atol=2e-5 * np.abs(want).max())


def test_dense_reference_takes_any_leading_dims():
    s, t, mask = _logits("neg_inf", seed=1)
    kw = dict(alpha=0.5, temperature=1.3)
    flat = kernels.generalized_jsd_reference(s, t, mask=mask, **kw)
    grid = kernels.generalized_jsd_reference(
        s.reshape(2, 5, V), t.reshape(2, 5, V), mask=mask.reshape(2, 5), **kw
    )
    assert grid.shape == (2, 5)
    np.testing.assert_array_equal(np.asarray(grid).reshape(N), np.asarray(flat))
    valid = np.where(mask[:, None], s, 0)
    no_mask = kernels.generalized_jsd_reference(valid, np.where(mask[:, None], t, 0), **kw)
    np.testing.assert_array_equal(np.asarray(no_mask)[mask], np.asarray(flat)[mask])
    with pytest.raises(ValueError, match="leading shape"):
        kernels.generalized_jsd_reference(s, t, mask=mask[:5], **kw)
    with pytest.raises(ValueError, match="row mismatch"):
        kernels.generalized_jsd_reference(s.reshape(2, 5, V), t, **kw)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_dense_reference_float64_gradients_into_both_arguments(alpha):
    """float64 stays float64; the student gradient matches the oracle's closed form and the
    teacher gradient (the reference does not detach it) matches central differences."""
    rng = np.random.default_rng(8)
    s, t = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    kw = dict(alpha=alpha, temperature=0.8)
    with jax.enable_x64(True):
        s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
        d = kernels.generalized_jsd_reference(s64, t64, **kw)
        assert d.dtype == jnp.float64
        total = lambda x, y: kernels.generalized_jsd_reference(x, y, **kw).sum()  # noqa: E731
        g_s, g_t = jax.grad(total, argnums=(0, 1))(s64, t64)
    np.testing.assert_allclose(g_s, reference.generalized_jsd_grad(s, t, **kw), atol=1e-12)
    eps, fd = 1e-6, np.zeros_like(t)
    for i in np.ndindex(t.shape):
        e = np.zeros_like(t)
        e[i] = eps
        up = reference.generalized_jsd(s, t + e, **kw).sum()
        fd[i] = (up - reference.generalized_jsd(s, t - e, **kw).sum()) / (2 * eps)
    np.testing.assert_allclose(g_t, fd, atol=1e-8)


def test_opd_generalized_jsd_is_the_dense_reference():
    """No twin: jaxpost.opd's dense D_α gives the reference's values and gradients, bit for bit."""
    s, t, _ = _logits("neg_inf", seed=2)
    s, t = s[[0, 2, 3, 5, 6, 7]].reshape(2, 3, V), t[[0, 2, 3, 5, 6, 7]].reshape(2, 3, V)
    for alpha in ALPHAS:
        kw = dict(alpha=alpha, temperature=0.9)

        def value_and_grads(fn, kw=kw):
            return jax.value_and_grad(lambda x, y: fn(x, y, **kw).sum(), argnums=(0, 1))(s, t)

        got = value_and_grads(opd.generalized_jsd)
        want = value_and_grads(kernels.generalized_jsd_reference)
        jax.tree.map(np.testing.assert_array_equal, got, want)
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(got))
