"""OPD losses as frozen specs: the logits face and the hidden-state face agree; the specs compose.

`spec(student_logits, teacher_logits, mask)` and `spec.from_hidden(h_S, W_S, h_T, W_T, mask)`
must give the same loss, aux and gradients whenever the logits are h @ W: for every kind, with
a prefix, a temperature, tied ([V, D]) or untied ([D, V]) heads and several vocabulary blocks.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from jaxpost import losses, opd

B, L, D, DT, V = 3, 5, 8, 6, 40
BLOCKS = kernels.BlockSizes(block_vocab=16)  # three blocks, the last one overlapping

SPECS = {
    "forward_kl": opd.opd_kl(0.0),
    "jsd": opd.opd_kl(0.5, temperature=0.8),
    "reverse_kl": opd.opd_kl(1.0, temperature=1.5),
    "entropy_aware": opd.entropy_aware_opd_kl(temperature=0.9),
    "entropy_aware_hard": opd.entropy_aware_opd_kl(threshold=0.95),
    "prefix_reverse": opd.prefix_opd(opd.opd_kl(1.0), 2),
    "prefix_entropy_aware": opd.prefix_opd(opd.entropy_aware_opd_kl(), 3),
}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) * 0.7, jnp.float32)
    th = jnp.asarray(h[..., :DT] + rng.normal(size=(B, L, DT)) * 0.5, jnp.float32)
    tw = jnp.asarray(rng.normal(size=(DT, V)) * 0.7, jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]], jnp.float32)
    return h, w, th, tw, mask


@pytest.mark.parametrize("layout", ["DV", "VD"])
@pytest.mark.parametrize("name", list(SPECS))
def test_from_hidden_equals_the_logits_form(name, layout):
    spec = SPECS[name]
    h, w, th, tw, mask = _inputs()
    as_head = (lambda x: x) if layout == "DV" else (lambda x: x.T)  # noqa: E731

    def on_logits(h_, w_):
        return spec(h_ @ w_, th @ tw, mask)

    def on_hidden(h_, head_):
        return spec.from_hidden(h_, head_, th, as_head(tw), mask, head_layout=layout,
                                teacher_head_layout=layout, block_sizes=BLOCKS)  # fmt: skip

    (want, want_aux), want_grads = jax.value_and_grad(on_logits, (0, 1), has_aux=True)(h, w)
    (got, aux), (g_h, g_head) = jax.jit(jax.value_and_grad(on_hidden, (0, 1), has_aux=True))(
        h, as_head(w))  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(aux, want_aux, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close((g_h, as_head(g_head)), want_grads, rtol=1e-5, atol=1e-6)
    assert float(got) > 0


def test_specs_keep_their_signatures_and_are_hashable_data():
    spec = opd.opd_kl(0.5, temperature=0.7)
    assert isinstance(spec, opd.OPDLossSpec) and spec == opd.opd_kl(0.5, temperature=0.7)
    assert hash(spec) == hash(opd.opd_kl(0.5, temperature=0.7)) and spec.alpha == 0.5
    assert losses.OPDLossSpec is opd.OPDLossSpec
    prefixed = opd.prefix_opd(spec, 3)
    assert prefixed == opd.OPDLossSpec("kl", alpha=0.5, temperature=0.7, prefix_len=3)
    assert opd.prefix_opd(prefixed, 5).prefix_len == 3  # prefixes compose: the shorter wins
    assert opd.prefix_opd(prefixed, 1).prefix_len == 1
    assert opd.opd_kl(1.0).on_kernel("xla") == opd.opd_kl(1.0, impl="xla")
    aware = opd.entropy_aware_opd_kl()
    assert aware.on_kernel("pallas_gpu") is aware  # no kernel over logits: the dense formula

    # a spec is a static argument: one trace per spec
    @jax.jit
    def apply(s, t, m):
        return jax.tree.map(lambda f: f(s, t, m)[0], {"a": spec, "b": aware})

    h, w, th, tw, mask = _inputs(1)
    out = apply(h @ w, th @ tw, mask)
    np.testing.assert_allclose(out["a"], spec(h @ w, th @ tw, mask)[0], rtol=1e-6)


def test_prefix_opd_wraps_a_plain_function():
    h, w, th, tw, mask = _inputs(2)
    plain = lambda s, t, m: (jnp.sum(m), {})  # noqa: E731
    wrapped = opd.prefix_opd(plain, 2)
    assert not isinstance(wrapped, opd.OPDLossSpec)
    assert float(wrapped(h @ w, th @ tw, mask)[0]) == float(opd.prefix_mask(mask, 2).sum())


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: opd.OPDLossSpec(kind="jsd"), "kind must be one of"),
        (lambda: opd.OPDLossSpec(alpha=True), "alpha"),
        (lambda: opd.OPDLossSpec(temperature=0.0), "temperature"),
        (lambda: opd.OPDLossSpec(threshold=0.5), "threshold is for entropy_aware only"),
        (lambda: opd.entropy_aware_opd_kl(threshold=1.5), "threshold is a normalized entropy"),
        (lambda: opd.OPDLossSpec(prefix_len=-1), "prefix_len"),
        (lambda: opd.prefix_opd(opd.opd_kl(1.0), True), "prefix_len"),
        (lambda: opd.opd_kl(1.0, impl=3), "impl must be None or a kernels implementation"),
        (lambda: opd.OPDLossSpec("entropy_aware", impl="xla"), "no kernel over materialized"),
    ],
)
def test_bad_specs_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_from_hidden_refuses_mismatched_positions_and_vocabularies():
    h, w, th, tw, mask = _inputs(3)
    spec = opd.opd_kl(1.0)
    with pytest.raises(ValueError, match="same \\[B, L\\] positions"):
        spec.from_hidden(h, w, th[:, :4], tw, mask)
    with pytest.raises(ValueError, match="mask"):
        spec.from_hidden(h, w, th, tw, mask[:, :4])
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        spec.from_hidden(h, w, th, tw[:, :30], mask)
