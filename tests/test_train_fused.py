"""loss_impl="fused_linear" equals "materialized" for every objective: loss, aux and gradients.

The fused path computes each loss from hidden states and the LM head in vocabulary blocks
(kernels.fused_linear_*); the materialized path forms the [N, M, V] logits. Both must give the
same numbers on tied and untied heads, the three families, OPSD's wider teacher prompt, every
OPD variant, a reference policy and gradient accumulation; and the fused program must hold no
array with a vocabulary-sized axis besides the parameters.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost import data, losses, models, train
from jaxpost.errors import UserError

QWEN2 = models.get_config("tiny", vocab_size=64, n_layers=1)  # tied, qkv bias
LLAMA = models.ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                           n_kv_heads=2, head_dim=8, mlp_dim=64, tie_embeddings=False)  # fmt: skip
QWEN3 = models.ModelConfig(family="qwen3", vocab_size=64, d_model=32, n_layers=1, n_heads=4,
                           n_kv_heads=2, head_dim=8, mlp_dim=64, qk_norm=True)  # fmt: skip
# Two 4096-column blocks (the last one overlapping), so the wiring meets the blockwise sweep.
WIDE = models.get_config("tiny", vocab_size=5000, d_model=32, n_layers=1, mlp_dim=64)
CONFIGS = {"qwen2_tied": QWEN2, "llama_untied": LLAMA, "qwen3_tied": QWEN3, "wide_v5000": WIDE}
TOL = dict(rtol=1e-5, atol=1e-7)
slow = pytest.mark.slow  # the fast tier keeps one case per head kind and loss family


def sft_batch(vocab, seed=0, B=4, L=12):
    rng = np.random.default_rng(seed)
    lengths = np.resize([L, L - 3, L - 1, L - 5], B)
    attention = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = attention.copy()
    loss_mask[:, :4] = 0  # the prompt
    tokens = rng.integers(3, vocab, (B, L)).astype(np.int32) * attention
    return data.SequenceBatch(jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(loss_mask))


def completion_batch(vocab, seed=0, N=4, P=6, M=5, teacher_width=None):
    """Left-padded prompts, right-padded completions; with teacher_width an OPSD privileged
    teacher prompt: the student's prompt behind extra (random) tokens, padded to that width."""
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((N, P), np.int32)
    prompt_mask[::2, :2] = 0
    completion_mask = (np.arange(M)[None] < np.resize([M, 2, 4, 1], N)[:, None]).astype(np.int32)
    prompt = rng.integers(3, vocab, (N, P)).astype(np.int32) * prompt_mask
    batch = data.CompletionBatch(
        prompt_tokens=prompt, prompt_mask=prompt_mask,
        completion=rng.integers(3, vocab, (N, M)).astype(np.int32) * completion_mask,
        completion_mask=completion_mask,
        old_logp=-rng.uniform(2.0, 5.0, (N, M)).astype(np.float32) * completion_mask,
        advantages=rng.normal(size=N).astype(np.float32),
    )  # fmt: skip
    if teacher_width is not None:
        extra = rng.integers(3, vocab, (N, teacher_width - P)).astype(np.int32)
        t_tokens = np.concatenate([extra, prompt], axis=1)
        t_mask = np.concatenate([np.ones_like(extra), prompt_mask], axis=1)
        t_mask[1, : teacher_width - P - 1] = 0  # a shorter privileged context on one row
        batch = batch.replace(teacher_prompt_tokens=t_tokens * t_mask, teacher_prompt_mask=t_mask)
    return jax.tree.map(jnp.asarray, batch)


def value_and_grad(objective, params, batch, *frozen):
    fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (loss, aux), grads = fn(params, batch, *frozen)
    return loss, aux, grads


def assert_same(materialized, fused, params, batch, *frozen):
    loss_m, aux_m, g_m = value_and_grad(materialized, params, batch, *frozen)
    loss_f, aux_f, g_f = value_and_grad(fused, params, batch, *frozen)
    np.testing.assert_allclose(loss_f, loss_m, **TOL)
    assert set(aux_f) == set(aux_m)
    chex.assert_trees_all_close(aux_f, aux_m, rtol=1e-5, atol=1e-6)
    # Per parameter: ‖g_f − g_m‖ ≤ 1e-5·‖g_m‖, and element-wise within rtol 1e-5 up to an atol of
    # 1e-5 of the largest entry (summing V terms in another order moves the ~1e-9 entries).
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_m)):
        assert jnp.linalg.norm(a - b) <= 1e-5 * jnp.linalg.norm(b) + 1e-12
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_m))
    chex.assert_trees_all_close(g_f, g_m, rtol=1e-5, atol=1e-5 * scale)
    chex.assert_tree_all_finite(g_f)
    return loss_f, aux_f


@pytest.mark.parametrize("name", ["qwen2_tied", "llama_untied", pytest.param("qwen3_tied", marks=slow),
                                  pytest.param("wide_v5000", marks=slow)])  # fmt: skip
def test_sft_fused_equals_materialized(name):
    config = CONFIGS[name]
    params = models.init(config, seed=1)
    _, aux = assert_same(train.sft_objective(config), train.sft_objective(config, "fused_linear"),
                         params, sft_batch(config.vocab_size))  # fmt: skip
    assert set(aux) == {"num_tokens", "nll_sum", "accuracy"}


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("qwen2_tied", dict(with_reference=True, kl_beta=0.1, loss_type="grpo")),
        pytest.param(
            "llama_untied", dict(with_reference=True, kl_beta=0.05, eps_high=0.28), marks=slow
        ),
        pytest.param("qwen3_tied", dict(importance="sequence", loss_type="dr_grpo"), marks=slow),
        pytest.param("wide_v5000", dict(with_reference=True, kl_beta=0.1), marks=slow),
    ],
)
def test_grpo_fused_equals_materialized(name, kwargs):
    config = CONFIGS[name]
    params = models.init(config, seed=1)
    frozen = (models.init(config, seed=2),) if kwargs.get("with_reference") else ()
    batch = completion_batch(config.vocab_size)
    materialized = train.grpo_objective(config, **kwargs)
    fused = train.grpo_objective(config, loss_impl="fused_linear", **kwargs)
    _, aux = assert_same(materialized, fused, params, batch, *frozen)
    assert aux["entropy"] > 0 and (aux["kl"] > 0) == bool(frozen)


OPD_LOSSES = {
    "forward_kl": losses.opd_kl(0.0),
    "jsd_tempered": losses.opd_kl(0.5, temperature=0.7),
    "reverse_kl": losses.opd_kl(1.0),
    "entropy_aware": losses.entropy_aware_opd_kl(temperature=1.3),
    "entropy_aware_hard": losses.entropy_aware_opd_kl(threshold=0.3),
    "prefix_reverse": losses.prefix_opd(losses.opd_kl(1.0), 2),
    "prefix_entropy_aware": losses.prefix_opd(losses.entropy_aware_opd_kl(), 3),
}
# (student, teacher): tied and untied heads on either side, different widths.
PAIRS = [("qwen2_tied", "llama_untied"), ("llama_untied", "qwen3_tied"),
         ("qwen3_tied", "qwen2_tied")]  # fmt: skip


OPSD = ("forward_kl", "reverse_kl", "entropy_aware_hard", "prefix_reverse")
FAST_OPD = ("reverse_kl", "prefix_entropy_aware")  # OPSD / plain view, both divergence kinds


@pytest.mark.parametrize(
    "loss", [n if n in FAST_OPD else pytest.param(n, marks=slow) for n in OPD_LOSSES]
)
def test_opd_fused_equals_materialized(loss):
    index = list(OPD_LOSSES).index(loss)
    student, teacher = (CONFIGS[n] for n in PAIRS[index % len(PAIRS)])
    params, t_params = models.init(student, seed=1), models.init(teacher, seed=3)
    opsd = loss in OPSD  # these see a privileged, wider teacher prompt
    batch = completion_batch(64, seed=index, teacher_width=9 if opsd else None)
    spec = OPD_LOSSES[loss]
    materialized = train.opd_objective(student, teacher, spec)
    fused = train.opd_objective(student, teacher, spec, loss_impl="fused_linear")
    loss_value, _ = assert_same(materialized, fused, params, batch, t_params)
    assert loss_value > 0


@slow
def test_opd_fused_over_vocabulary_blocks_and_kernel_impl():
    params, t_params = models.init(WIDE, seed=1), models.init(WIDE, seed=4)
    batch = completion_batch(WIDE.vocab_size, teacher_width=8)
    for spec in (losses.opd_kl(1.0), losses.entropy_aware_opd_kl()):
        assert_same(train.opd_objective(WIDE, WIDE, spec),
                    train.opd_objective(WIDE, WIDE, spec, loss_impl="fused_linear"),
                    params, batch, t_params)  # fmt: skip
    # a kernel name runs opd_kl's D_α kernel over materialized logits
    xla = train.opd_objective(WIDE, WIDE, losses.opd_kl(1.0), loss_impl="xla")
    assert_same(train.opd_objective(WIDE, WIDE, losses.opd_kl(1.0)), xla, params, batch, t_params)


@pytest.mark.parametrize("impl", [pytest.param("materialized", marks=slow), "fused_linear"])
def test_opsd_alignment_identical_views_give_zero(impl):
    """The teacher = the student, seeing its prompt behind more left padding: every completion
    position aligns, so each divergence is 0 on either path."""
    params = models.init(QWEN2, seed=1)
    batch = completion_batch(64)
    pad = jnp.zeros((4, 3), jnp.int32)
    batch = batch.replace(
        teacher_prompt_tokens=jnp.concatenate([pad, batch.prompt_tokens], axis=1),
        teacher_prompt_mask=jnp.concatenate([pad, batch.prompt_mask], axis=1),
    )
    for spec in (losses.opd_kl(0.5), losses.entropy_aware_opd_kl()):
        loss, _ = train.opd_objective(QWEN2, QWEN2, spec, loss_impl=impl)(params, batch, params)
        np.testing.assert_allclose(loss, 0.0, atol=1e-6)


@slow
def test_grad_accumulation_on_the_fused_path():
    opt = optax.sgd(1.0)
    params, t_params = models.init(LLAMA, seed=0), models.init(QWEN2, seed=5)
    rollouts = completion_batch(64, N=4, teacher_width=8)
    state = train.init_state(params, opt)
    cases = [
        (lambda impl: train.sft_objective(LLAMA, impl), sft_batch(64), ()),
        (lambda impl: train.grpo_objective(LLAMA, loss_impl=impl), rollouts, ()),
        (lambda impl: train.opd_objective(LLAMA, QWEN2, losses.opd_kl(0.5), impl), rollouts,
         (t_params,)),
    ]  # fmt: skip
    for make, batch, frozen in cases:
        # (the mean of micro-batch means is not the full batch's mean when their token counts
        # differ, so the reference accumulates too)
        new = {}
        for impl in ("materialized", "fused_linear"):
            step = jax.jit(train.make_step(make(impl), opt, grad_accum=2))
            new[impl], metrics = step(state, batch, *frozen)
            assert int(metrics["finite"]) == 1
        chex.assert_trees_all_close(new["fused_linear"].params, new["materialized"].params,
                                    rtol=1e-5, atol=1e-6)  # fmt: skip
        assert not np.allclose(new["materialized"].params["embed"], params["embed"])


def _avals(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _avals(sub)


@pytest.mark.parametrize("paradigm", ["sft", "grpo", "opd"])
def test_fused_program_holds_no_vocabulary_sized_activation(paradigm):
    """In the fused value-and-grad, the only arrays with a V-sized axis are [V, D] (the table,
    its gradient) and [V] index vectors (the embedding gradient's gather, models/embedding.py);
    the materialized one has [.., V] logits."""
    v, d = WIDE.vocab_size, WIDE.d_model
    params = models.init(WIDE, seed=0)
    frozen, batch = (), completion_batch(v)
    if paradigm == "sft":
        make, batch = (lambda impl: train.sft_objective(WIDE, impl)), sft_batch(v)
    elif paradigm == "grpo":
        make = lambda impl: train.grpo_objective(WIDE, loss_impl=impl, with_reference=True)  # noqa: E731
        frozen = (params,)
    else:
        make = lambda impl: train.opd_objective(WIDE, WIDE, losses.opd_kl(1.0), impl)  # noqa: E731
        frozen = (params,)

    def shapes(impl):
        grad = jax.value_and_grad(make(impl), has_aux=True)
        jaxpr = jax.make_jaxpr(grad)(params, batch, *frozen).jaxpr
        return {a.shape for a in _avals(jaxpr) if hasattr(a, "shape") and v in a.shape}

    assert shapes("fused_linear") <= {(v, d), (v,), (v, 1)}, shapes("fused_linear")
    assert any(s[-1] == v and s != (d, v) for s in shapes("materialized"))


def test_resolve_loss_impl():
    big = QWEN2.replace(vocab_size=train.FUSED_MIN_VOCAB)
    assert train.resolve_loss_impl("auto", QWEN2) == "materialized"
    assert train.resolve_loss_impl("auto", big) == "fused_linear"
    assert train.resolve_loss_impl("auto", big.replace(vocab_size=train.FUSED_MIN_VOCAB - 1)) == (
        "materialized")  # fmt: skip
    for name in train.LOSS_IMPLS[1:]:
        assert train.resolve_loss_impl(name, QWEN2) == name
    with pytest.raises(UserError, match="fused_linear, xla"):
        train.resolve_loss_impl("fused", QWEN2)
    with pytest.raises(UserError, match="unknown loss_impl 'dense'"):
        train.sft_objective(QWEN2, loss_impl="dense")


def test_plain_function_losses_and_kernel_names():
    """A plain function of logits has no hidden-state form: auto materializes, fused raises."""
    params = models.init(QWEN2, seed=1)
    batch = completion_batch(64)
    plain = lambda s, t, m: losses.opd_kl(1.0)(s, t, m)  # noqa: E731
    big = QWEN2.replace(vocab_size=train.FUSED_MIN_VOCAB)
    train.opd_objective(big, big, plain, loss_impl="auto")  # builds: materialized
    for impl in ("fused_linear", "xla"):
        with pytest.raises(UserError, match="needs an OPD loss built by jaxpost.opd"):
            train.opd_objective(QWEN2, QWEN2, plain, loss_impl=impl)
    want, _ = train.opd_objective(QWEN2, QWEN2, losses.opd_kl(1.0))(params, batch, params)
    got, _ = train.opd_objective(QWEN2, QWEN2, plain)(params, batch, params)
    np.testing.assert_allclose(got, want)
    # SFT and GRPO have no divergence kernel: a kernel name means materialized logits
    sft = sft_batch(64)
    np.testing.assert_allclose(train.sft_objective(QWEN2, "pallas_gpu")(params, sft)[0],
                               train.sft_objective(QWEN2)(params, sft)[0])  # fmt: skip
