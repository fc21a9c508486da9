"""kernels.generalized_jsd against the float64 NumPy reference, for every implementation.

The forward/gradient grid runs twice, as jax's own Pallas tests do: `TestInterpret` on any
backend (the Pallas kernels in the interpreter: the CPU tier CI runs) and `TestCompiled`, marked
`accelerator`, with the kernels compiled (on a GPU: pallas_gpu and xla; on a TPU: pallas_tpu
and xla; skipped on CPU). Shapes are small but chosen to hit the edges: N = 10 is not a multiple
of the TPU row block (8), V = 300 is not a multiple of the vocabulary block (128), so every
implementation handles a ragged last tile in both axes. Every kernel output buffer is
NaN-poisoned (kernels.set_poison_outputs), so a tile a kernel forgets to write fails the
comparison instead of passing as zeros.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import reference
from kernels.jsd import compiles_here

N, V = 10, 300
BLOCKS = kernels.BlockSizes(block_rows=8, block_vocab=128)
ALPHAS = (0.0, 0.25, 0.5, 1.0)

# (forward atol, forward rtol, gradient tolerance relative to max |reference gradient|). The
# reference sees the same (rounded) inputs, so bfloat16 only adds the rounding of its output
# gradient (8 bits of mantissa) on top of float32 arithmetic.
TOLERANCES = {
    jnp.float32: (2e-5, 2e-5, 2e-5),
    jnp.bfloat16: (2e-5, 2e-5, 1e-2),
}


@pytest.fixture(autouse=True)
def _poison_outputs():
    kernels.set_poison_outputs(True)
    yield
    kernels.set_poison_outputs(False)


def _logits(case: str, alpha: float, seed: int = 0):
    """(student, teacher, mask) float32 NumPy arrays for one named situation."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(N, V)).astype(np.float32) * 3
    t = rng.normal(size=(N, V)).astype(np.float32) * 3
    mask = None
    if case == "large":
        # ±1e4 offsets: exp overflows without the max shift, and x/τ in float32 loses ~1e-3.
        s += 1e4
        t -= 1e4
    elif case == "neg_inf":
        both = rng.random((N, V)) < 0.2
        s[both] = -np.inf
        t[both] = -np.inf
        # One-sided zeros that keep the divergence finite: where the weighing distribution is 0.
        one = rng.random((N, V)) < 0.1
        if alpha < 1:
            t[one & ~both] = -np.inf  # p_T = 0: fine for KL(p_T‖·) and the mixture
        else:
            s[one & ~both] = -np.inf  # p_S = 0: fine for KL(p_S‖p_T)
        s[:, 0] = t[:, 0] = 0.0  # every row keeps some mass
    elif case == "masked":
        mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 0], bool)
        s[1] = np.nan
        s[4] = np.inf
        t[9] = -np.inf
    return s, t, mask


def _compare(impl, alpha, dtype, case, temperature=0.7, interpret=True):
    s, t, mask = _logits(case, alpha)
    s_in, t_in = jnp.asarray(s, dtype), jnp.asarray(t, dtype)
    # The reference sees exactly the values the kernel sees.
    s64 = np.asarray(s_in.astype(jnp.float32), np.float64)
    t64 = np.asarray(t_in.astype(jnp.float32), np.float64)
    ct = np.random.default_rng(1).uniform(0.5, 2.0, size=N).astype(np.float32)
    kw = dict(alpha=alpha, temperature=temperature, mask=mask)

    def loss(x):
        d = kernels.generalized_jsd(
            x, t_in, impl=impl, block_sizes=BLOCKS, interpret=interpret, **kw
        )
        return (d * ct).sum(), d

    (_, d), g = jax.value_and_grad(loss, has_aux=True)(s_in)
    want_d = reference.generalized_jsd(s64, t64, **kw)
    want_g = reference.generalized_jsd_grad(s64, t64, cotangent=ct, **kw)
    atol, rtol, gtol = TOLERANCES[dtype]
    assert d.shape == (N,) and d.dtype == jnp.float32
    assert g.shape == (N, V) and g.dtype == dtype
    np.testing.assert_allclose(np.asarray(d), want_d, atol=atol, rtol=rtol)
    g = np.asarray(g.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(g, want_g, atol=gtol * np.abs(want_g).max(), rtol=0)
    if mask is not None:
        assert np.all(np.asarray(d)[~mask] == 0) and np.all(g[~mask] == 0)


class _Grid:
    """Forward and gradient against the float64 reference; subclasses set INTERPRET."""

    INTERPRET: bool

    def skip_unless_it_runs(self, impl):
        if not self.INTERPRET and not compiles_here(impl):
            pytest.skip(f"{impl} does not compile on {jax.default_backend()!r}")

    def run(self, impl, alpha, dtype, case, **kw):
        self.skip_unless_it_runs(impl)
        _compare(impl, alpha, dtype, case, interpret=self.INTERPRET, **kw)

    @pytest.mark.parametrize("alpha", ALPHAS)
    @pytest.mark.parametrize("impl", kernels.IMPLS)
    def test_matches_reference_float32(self, impl, alpha):
        self.run(impl, alpha, jnp.float32, "plain")

    @pytest.mark.parametrize("case", ["large", "neg_inf", "masked"])
    @pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
    @pytest.mark.parametrize("impl", kernels.IMPLS)
    def test_edge_cases(self, impl, alpha, case):
        self.run(impl, alpha, jnp.float32, case)

    @pytest.mark.parametrize("alpha", [0.25, 1.0])
    @pytest.mark.parametrize("impl", kernels.IMPLS)
    def test_bfloat16(self, impl, alpha):
        self.run(impl, alpha, jnp.bfloat16, "plain", temperature=1.5)

    @pytest.mark.parametrize("impl", kernels.IMPLS)
    def test_one_block_wider_than_vocab_and_jit(self, impl):
        """A block larger than V (clamped) and the whole thing under jit."""
        self.skip_unless_it_runs(impl)
        s, t, _ = _logits("plain", 0.5, seed=3)
        blocks = kernels.BlockSizes(block_rows=16, block_vocab=512)
        f = jax.jit(lambda x: kernels.generalized_jsd(x, t, alpha=0.5, impl=impl,
                                                      block_sizes=blocks,
                                                      interpret=self.INTERPRET).sum())  # fmt: skip
        np.testing.assert_allclose(
            f(s), reference.generalized_jsd(s, t, alpha=0.5).sum(), rtol=2e-5, atol=1e-5
        )


class TestInterpret(_Grid):
    """Any backend: the Pallas kernels run in the Pallas interpreter; xla as XLA compiles it."""

    INTERPRET = True


@pytest.mark.accelerator
class TestCompiled(_Grid):
    """The same grid compiled on a GPU or TPU: this backend's Pallas kernel and xla."""

    INTERPRET = False


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_compiled_pallas_off_its_backend_names_interpret_as_the_fix(impl):
    if compiles_here(impl):
        pytest.skip(f"{impl} compiles on {jax.default_backend()!r}")
    s, t, _ = _logits("plain", 0.5)
    with pytest.raises(ValueError, match=r"compiles only on .*pass interpret=True"):
        kernels.generalized_jsd(s, t, alpha=0.5, impl=impl)
    d = kernels.generalized_jsd(s, t, alpha=0.5, impl=impl, block_sizes=BLOCKS, interpret=True)
    np.testing.assert_allclose(d, reference.generalized_jsd(s, t, alpha=0.5), rtol=2e-5, atol=1e-5)


def test_xla_ignores_interpret_and_none_is_the_backends_best():
    s, t, _ = _logits("plain", 0.25)
    run = lambda **kw: np.asarray(kernels.generalized_jsd(s, t, alpha=0.25, **kw))  # noqa: E731
    np.testing.assert_array_equal(run(impl="xla", interpret=True), run(impl="xla"))
    np.testing.assert_array_equal(run(), run(impl=kernels.default_impl()))


def test_divergence_of_a_distribution_with_itself_is_zero():
    s, _, _ = _logits("plain", 0.0)
    for alpha in ALPHAS:
        d = kernels.generalized_jsd(s, s, alpha=alpha, temperature=2.0, block_sizes=BLOCKS)
        np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-6)


def test_shift_invariance_and_temperature_limit():
    """D depends on logits only through softmax: adding a per-row constant changes nothing."""
    s, t, _ = _logits("plain", 0.25)
    shift = np.linspace(-50, 50, N, dtype=np.float32)[:, None]
    d0 = kernels.generalized_jsd(s, t, alpha=0.25, block_sizes=BLOCKS)
    d1 = kernels.generalized_jsd(s + shift, t - shift, alpha=0.25, block_sizes=BLOCKS)
    np.testing.assert_allclose(np.asarray(d0), np.asarray(d1), rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient():
    s, t, _ = _logits("plain", 0.5)
    g = jax.grad(lambda y: kernels.generalized_jsd(s, y, alpha=0.5).sum())(t)
    assert np.all(np.asarray(g) == 0)


def test_default_impl_per_backend():
    assert kernels.default_impl() == kernels.default_impl(jax.default_backend())
    assert kernels.default_impl("cpu") == "xla"
    assert kernels.default_impl("tpu") == "pallas_tpu"
    assert kernels.default_impl("gpu") == "pallas_gpu"
    assert kernels.IMPLS == ("xla", "pallas_tpu", "pallas_gpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(teacher=np.zeros((N, V + 1), np.float32)), "vocabulary mismatch"),
        (dict(teacher=np.zeros((N + 1, V), np.float32)), "row mismatch"),
        (dict(student=np.zeros((N, V, 1), np.float32)), r"must be \[N, V\]"),
        (dict(student=np.zeros((N, V), np.int32)), "floating point"),
        (dict(alpha=1.5), r"alpha must lie in \[0, 1\]"),
        (dict(alpha=-0.1), r"alpha must lie in \[0, 1\]"),
        (dict(alpha=jnp.float32(0.5)), "Python float"),
        (dict(temperature=0.0), "temperature must be finite and > 0"),
        (dict(temperature=-1.0), "temperature must be finite and > 0"),
        (dict(impl="cuda"), "unknown impl 'cuda'"),
        (dict(interpret=1), "interpret must be True or False"),
        (dict(mask=np.ones(N + 1, bool)), r"mask must have shape \[N\]"),
        (dict(block_sizes=kernels.BlockSizes(8, 100), impl="pallas_tpu"), "multiple|% 128"),
        (dict(block_sizes=kernels.BlockSizes(1, 384), impl="pallas_gpu"), "power-of-two"),
    ],
)
def test_validation_errors(kwargs, message):
    args = dict(
        student=np.zeros((N, V), np.float32),
        teacher=np.zeros((N, V), np.float32),
        alpha=0.5,
    )
    args.update(kwargs)
    student, teacher = args.pop("student"), args.pop("teacher")
    with pytest.raises(ValueError, match=message):
        kernels.generalized_jsd(student, teacher, **args)


def test_block_sizes_validate_themselves():
    with pytest.raises(ValueError, match="positive int"):
        kernels.BlockSizes(block_rows=0)
    with pytest.raises(ValueError, match="positive int"):
        kernels.BlockSizes(block_vocab=128.0)
