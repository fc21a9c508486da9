"""The RL objectives' additions against float64 formulas: the loss mask, the entropy bonus (value
and gradient, materialized and fused paths), and sampled-token OPD's per-token advantages
A_t = A_reward + coef · (log π_T(y_t) − log π_old(y_t)) (the tinker recipe)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_losses_refs as refs
from test_train_fused import CONFIGS, assert_same, completion_batch

from jaxpost import models, objectives, train

CONFIG = CONFIGS["qwen2_tied"]
TEACHER = CONFIGS["llama_untied"]


def _logits64(config, params, prompt, prompt_mask, batch):
    logits = objectives.completion_logits(config, params, prompt, prompt_mask, batch.completion,
                                          batch.completion_mask)  # fmt: skip
    return np.asarray(logits, np.float64)


def _token_logp64(logits, targets):
    lp = refs.log_softmax(logits)
    return np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]


def _batch_with_loss_mask(seed=0):
    batch = completion_batch(CONFIG.vocab_size, seed=seed, teacher_width=8)
    loss_mask = np.asarray(batch.completion_mask).copy()
    loss_mask[0, 1] = 0  # a token inside a completion left out of the loss
    loss_mask[2] = 0  # and a whole row
    return batch.replace(loss_mask=jnp.asarray(loss_mask))


def test_grpo_objective_counts_only_the_loss_mask():
    params = models.init(CONFIG, seed=1)
    batch = _batch_with_loss_mask()
    loss, aux = train.grpo_objective(CONFIG, loss_type="grpo")(params, batch)
    logp = _token_logp64(_logits64(CONFIG, params, batch.prompt_tokens, batch.prompt_mask, batch),
                         batch.completion)  # fmt: skip
    want = refs.grpo(logp, batch.old_logp, batch.advantages, batch.loss_mask, loss_type="grpo")
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    assert float(aux["num_tokens"]) == float(np.asarray(batch.loss_mask).sum())


@pytest.mark.parametrize("impl", ["materialized", "fused_linear"])
def test_entropy_bonus_value_and_gradient(impl):
    params = models.init(CONFIG, seed=1)
    batch = _batch_with_loss_mask(seed=3)
    coef = 0.3
    plain = train.grpo_objective(CONFIG, loss_impl=impl)
    bonus = train.grpo_objective(CONFIG, loss_impl=impl, entropy_coef=coef)

    def mean_entropy(p):  # the dense formula, by autodiff
        logits = objectives.completion_logits(CONFIG, p, batch.prompt_tokens, batch.prompt_mask,
                                              batch.completion, batch.completion_mask)  # fmt: skip
        lp = jax.nn.log_softmax(logits, -1)
        h = -(jnp.exp(lp) * lp).sum(-1)
        m = batch.loss_mask.astype(jnp.float32)
        return (h * m).sum() / m.sum()

    (l0, aux0), g0 = jax.jit(jax.value_and_grad(plain, has_aux=True))(params, batch)
    (l1, aux1), g1 = jax.jit(jax.value_and_grad(bonus, has_aux=True))(params, batch)
    h, gh = jax.jit(jax.value_and_grad(mean_entropy))(params)
    lp64 = refs.log_softmax(_logits64(CONFIG, params, batch.prompt_tokens, batch.prompt_mask, batch))
    h64 = refs.masked_mean(-(np.exp(lp64) * lp64).sum(-1), np.asarray(batch.loss_mask))
    np.testing.assert_allclose(float(aux1["entropy"]), h64, rtol=1e-5)
    np.testing.assert_allclose(float(l1), float(l0) - coef * h64, rtol=1e-5, atol=1e-6)
    want = jax.tree.map(lambda a, b: a - coef * b, g0, gh)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
    chex.assert_trees_all_close(g1, want, rtol=1e-4, atol=1e-5 * scale)
    assert float(h) > 0


def test_entropy_bonus_fused_equals_materialized():
    for name in ("llama_untied",):  # the tied head's fused path: the value-and-gradient test
        config = CONFIGS[name]
        kw = dict(entropy_coef=0.1, loss_type="grpo")
        assert_same(train.grpo_objective(config, **kw),
                    train.grpo_objective(config, loss_impl="fused_linear", **kw),
                    models.init(config, seed=1), _batch_with_loss_mask())  # fmt: skip


@pytest.mark.parametrize("reward", [False, True])
def test_sampled_opd_is_grpo_on_the_teachers_token_advantages(reward):
    """Loss and gradient against refs.grpo with A_t computed in float64 from both models' logits
    (the teacher in its privileged view), at π = π_old (ratio 1) and off it (clipping)."""
    params = models.init(CONFIG, seed=1)
    teacher = models.init(CONFIG.replace(), seed=4)
    batch = _batch_with_loss_mask(seed=5)
    if not reward:
        batch = batch.replace(advantages=jnp.zeros_like(batch.advantages))
    coef = 0.7
    objective = train.sampled_opd_objective(CONFIG, CONFIG, coef=coef, loss_type="grpo")
    student = _token_logp64(_logits64(CONFIG, params, batch.prompt_tokens, batch.prompt_mask,
                                      batch), batch.completion)  # fmt: skip
    t_prompt, t_mask = batch.teacher_prompt()
    teacher_lp = _token_logp64(_logits64(CONFIG, teacher, t_prompt, t_mask, batch), batch.completion)
    mask = np.asarray(batch.loss_mask)
    direct = train.grpo_objective(CONFIG, loss_type="grpo")
    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    direct_grad = jax.jit(jax.grad(lambda p, x: direct(p, x)[0]))
    for old in (student, student - 0.3):  # on-policy, and a stale sampler (ratio e^0.3: clipped)
        b = batch.replace(old_logp=jnp.asarray(old, jnp.float32))
        adv = np.asarray(b.advantages, np.float64)[:, None] + coef * (teacher_lp - old) * mask
        (loss, aux), grads = grad_fn(params, b, teacher)
        want = refs.grpo(student, old, adv, mask, loss_type="grpo")
        np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(float(aux["sampled_reverse_kl"]),
                                   refs.masked_mean(old - teacher_lp, mask), rtol=1e-5)  # fmt: skip
        # the gradient: the grpo objective on the same per-token advantages, given directly
        given = b.replace(advantages=jnp.asarray(adv, jnp.float32))
        g_direct = direct_grad(params, given)
        chex.assert_trees_all_close(grads, g_direct, rtol=1e-5, atol=1e-7)
        assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_sampled_opd_fused_equals_materialized_and_refuses_bad_input():
    params, teacher = models.init(TEACHER, seed=1), models.init(TEACHER, seed=2)
    batch = _batch_with_loss_mask()
    assert_same(train.sampled_opd_objective(TEACHER, TEACHER),
                train.sampled_opd_objective(TEACHER, TEACHER, loss_impl="fused_linear"),
                params, batch, teacher)  # fmt: skip
    with pytest.raises(ValueError, match="vocabularies differ"):
        train.sampled_opd_objective(CONFIG, CONFIG.replace(vocab_size=65))
    with pytest.raises(ValueError, match="coef"):
        train.sampled_opd_objective(CONFIG, CONFIG, coef=0.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        train.grpo_objective(CONFIG, entropy_coef=-1.0)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_topk_opd_objective_against_float64_buckets(alpha):
    """The student's step on a top-k teacher's scores: loss = mean over trained tokens of D_α
    between the (k + 1)-bucket distributions, from float64 logits; fused equals materialized."""
    from jaxpost import teachers

    params, teacher = models.init(CONFIG, seed=1), models.init(CONFIG, seed=6)
    batch = _batch_with_loss_mask(seed=7)
    k = 6
    top = jax.jit(teachers.topk_teacher(CONFIG, k))(teacher, batch)
    fused_top = jax.jit(teachers.topk_teacher(CONFIG, k, loss_impl="fused_linear"))(teacher, batch)
    mask = np.asarray(batch.completion_mask, bool)
    np.testing.assert_array_equal(np.asarray(fused_top.idx)[mask], np.asarray(top.idx)[mask])
    np.testing.assert_allclose(np.asarray(fused_top.log_tail)[mask], np.asarray(top.log_tail)[mask],
                               atol=1e-5)  # fmt: skip
    batch = batch.replace(teacher_topk=top)
    loss, aux = teachers.topk_opd_objective(CONFIG, alpha=alpha)(params, batch)
    t_prompt, t_mask = batch.teacher_prompt()
    lt = refs.log_softmax(_logits64(CONFIG, teacher, t_prompt, t_mask, batch))
    ls = refs.log_softmax(_logits64(CONFIG, params, batch.prompt_tokens, batch.prompt_mask, batch))
    idx = np.argsort(-lt, axis=-1, kind="stable")[..., :k]

    def buckets(lp):
        top_p = np.exp(np.take_along_axis(lp, idx, -1))
        return np.concatenate([top_p, 1 - top_p.sum(-1, keepdims=True)], -1)

    pt, ps = buckets(lt), buckets(ls)
    div = refs.kl(pt, ps) if alpha == 0 else refs.kl(ps, pt)
    want = refs.masked_mean(div, np.asarray(batch.loss_mask))
    np.testing.assert_allclose(float(loss), want, rtol=2e-4, atol=1e-6)
    assert 0 < float(aux["teacher_tail_mass"]) < 1
    assert_same(teachers.topk_opd_objective(CONFIG, alpha=alpha),
                teachers.topk_opd_objective(CONFIG, alpha=alpha, loss_impl="fused_linear"),
                params, batch)  # fmt: skip
