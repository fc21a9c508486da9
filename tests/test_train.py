"""Train steps: skipped non-finite updates, gradient accumulation, objectives' alignment."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost import data, losses, models, train

CONFIG = models.get_config("tiny", vocab_size=32)


def _sft_batch(seed=0, B=4, L=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 32, (B, L)).astype(np.int32)
    attn = np.ones((B, L), np.int32)
    loss_mask = np.zeros((B, L), np.int32)
    loss_mask[:, 5:] = 1
    return data.SequenceBatch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attn),
                              loss_mask=jnp.asarray(loss_mask))  # fmt: skip


def _state():
    opt = train.make_optimizer(train.OptimConfig(learning_rate=1e-2, warmup_steps=0))
    return train.init_state(models.init(CONFIG, seed=0), opt, seed=0), opt


def test_non_finite_loss_is_skipped_and_counted():
    state, opt = _state()

    def objective(params, batch_and_scale):
        batch, scale = batch_and_scale
        loss, aux = train.sft_objective(CONFIG)(params, batch)
        return loss * scale, aux

    step = jax.jit(train.make_step(objective, opt))
    batch = _sft_batch()
    good, m1 = step(state, (batch, jnp.float32(1.0)))
    assert int(m1["finite"]) == 1 and int(good.skipped) == 0
    bad, m2 = step(good, (batch, jnp.float32(jnp.nan)))
    assert int(m2["finite"]) == 0 and int(bad.skipped) == 1 and int(bad.step) == 2
    chex.assert_trees_all_equal(bad.params, good.params)
    chex.assert_trees_all_equal(bad.opt_state, good.opt_state)
    chex.assert_tree_all_finite(bad.params)


def test_grad_accumulation_equals_the_full_batch():
    # Plain SGD, so the updated parameters expose the accumulated gradient itself (Adam's
    # normalisation would amplify rounding in near-zero gradients).
    opt = optax.sgd(1.0)
    state = train.init_state(models.init(CONFIG, seed=0), opt, seed=0)
    batch = _sft_batch(B=8)
    full, _ = jax.jit(train.make_step(train.sft_objective(CONFIG), opt))(state, batch)
    accum, _ = jax.jit(train.make_step(train.sft_objective(CONFIG), opt, grad_accum=4))(
        state, batch
    )
    chex.assert_trees_all_close(accum.params, full.params, atol=1e-6, rtol=1e-5)


def test_sft_step_lowers_the_loss():
    state, opt = _state()
    step = jax.jit(train.make_step(train.sft_objective(CONFIG), opt))
    batch = _sft_batch()
    losses_seen = []
    for _ in range(15):
        state, m = step(state, batch)
        losses_seen.append(float(m["loss"]))
    assert losses_seen[-1] < 0.5 * losses_seen[0]


def test_completion_logits_align_across_prompt_views():
    """The logits predicting completion token j are the same whatever the prompt padding."""
    params = models.init(CONFIG, seed=1)
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, 32, (2, 5)).astype(np.int32)
    completion = rng.integers(3, 32, (2, 4)).astype(np.int32)
    cmask = np.ones((2, 4), np.int32)
    a = train.completion_logits(CONFIG, params, prompt, np.ones_like(prompt), completion, cmask)
    wide = np.concatenate([np.zeros((2, 3), np.int32), prompt], axis=1)
    wide_mask = np.concatenate([np.zeros((2, 3), np.int32), np.ones_like(prompt)], axis=1)
    b = train.completion_logits(CONFIG, params, wide, wide_mask, completion, cmask)
    chex.assert_trees_all_close(a, b, atol=1e-5)
    full = models.apply(CONFIG, params, np.concatenate([prompt, completion], axis=1))
    chex.assert_trees_all_close(a, full[:, 4:8], atol=1e-5)


def test_opd_objective_refuses_different_vocabularies():
    teacher = models.get_config("tiny", vocab_size=33)
    with pytest.raises(ValueError, match="vocabularies differ"):
        train.opd_objective(CONFIG, teacher, losses.opd_kl(1.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(b2=1.0), "Adam betas"),
        (dict(grad_accum=0), "grad_accum must be >= 1"),
        (dict(clip_norm=-1.0), "clip_norm must be > 0"),
        (dict(end_lr_ratio=2.0), "end_lr_ratio"),
    ],
)
def test_bad_optimizer_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train.OptimConfig(**kwargs)


def test_grad_accum_must_divide_the_batch():
    state, opt = _state()
    step = train.make_step(train.sft_objective(CONFIG), opt, grad_accum=3)
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        step(state, _sft_batch(B=4))
