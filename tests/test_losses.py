"""SFT and RL losses against float64 NumPy references, finite differences, padding, bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_losses_refs as ref

from jaxpost import losses

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-6), jnp.bfloat16: dict(rtol=2e-5, atol=2e-6)}


def _mask(rng, b, l, min_len=1):
    """Right-padded completion mask with lengths in [min_len, l]; one row has full length."""
    lengths = rng.integers(min_len, l + 1, size=b)
    lengths[0] = l
    return (np.arange(l)[None, :] < lengths[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# token_logprobs, sft_loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_reference(dtype, temperature):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, dtype)
    targets = rng.integers(0, 11, size=(3, 5))
    got = losses.token_logprobs(logits, jnp.asarray(targets), temperature)
    expect = np.take_along_axis(
        ref.log_softmax(np.asarray(logits, np.float64) / temperature), targets[..., None], -1
    )[..., 0]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expect, **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sft_loss_matches_reference(dtype):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 6, 13)) * 2, dtype)
    targets = rng.integers(0, 13, size=(4, 6))
    mask = _mask(rng, 4, 6)
    loss, aux = losses.sft_loss(logits, jnp.asarray(targets), jnp.asarray(mask))
    logits64 = np.asarray(logits, np.float64)
    np.testing.assert_allclose(loss, ref.sft(logits64, targets, mask), **TOL[dtype])
    assert aux["num_tokens"] == mask.sum()
    np.testing.assert_allclose(aux["nll_sum"], loss * mask.sum(), rtol=1e-6)
    accuracy = ((logits64.argmax(-1) == targets) * mask).sum() / mask.sum()
    np.testing.assert_allclose(aux["accuracy"], accuracy, rtol=1e-6)


def test_sft_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 5))
    targets = jnp.asarray(rng.integers(0, 5, size=(2, 3)))
    mask = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    ref.assert_grad_matches_finite_differences(
        lambda x: losses.sft_loss(x, targets, mask)[0], logits
    )


def test_sft_loss_ignores_padding_and_masked_vocab():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 7, 9)).astype(np.float32)
    logits[:, :, -2:] = -np.inf  # vocabulary entries no model may emit
    targets = rng.integers(0, 7, size=(3, 7))
    mask = _mask(rng, 3, 7)
    pad = mask == 0
    garbage, garbage_targets = logits.copy(), targets.copy()
    garbage[pad] = rng.choice([1e30, -1e30, np.inf, -np.inf, np.nan], size=(pad.sum(), 9))
    garbage_targets[pad] = 8  # a −inf entry: its NLL would be +inf if it were counted

    def value_and_grad(x, y):
        fn = lambda x: losses.sft_loss(x, jnp.asarray(y), jnp.asarray(mask))[0]
        return jax.value_and_grad(fn)(jnp.asarray(x))

    clean_loss, clean_grad = value_and_grad(logits, targets)
    dirty_loss, dirty_grad = value_and_grad(garbage, garbage_targets)
    assert np.isfinite(clean_loss) and np.all(np.isfinite(clean_grad))
    np.testing.assert_array_equal(dirty_loss, clean_loss)
    np.testing.assert_array_equal(dirty_grad, clean_grad)
    assert np.all(np.asarray(dirty_grad)[pad] == 0)
    assert np.all(np.asarray(clean_grad)[..., -2:] == 0)


def test_sft_loss_empty_mask_is_zero_not_nan():
    loss, aux = losses.sft_loss(
        jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))
    )
    assert loss == 0 and aux["num_tokens"] == 0


def test_sft_loss_from_logprobs_is_sft_loss():
    """The fused path's entry point: the same loss and aux from the targets' logprobs alone."""
    rng = np.random.default_rng(9)
    logits = jnp.asarray(rng.normal(size=(3, 4, 11)) * 2, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (3, 4)))
    mask = jnp.asarray(_mask(rng, 3, 4))
    want, want_aux = losses.sft_loss(logits, targets, mask)
    correct = jnp.argmax(logits, -1) == targets
    got, aux = losses.sft_loss_from_logprobs(losses.token_logprobs(logits, targets), mask, correct)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert set(aux) == set(want_aux)
    for key in want_aux:
        np.testing.assert_allclose(aux[key], want_aux[key], rtol=1e-6)
    _, no_accuracy = losses.sft_loss_from_logprobs(jnp.zeros((3, 4)), mask)
    assert "accuracy" not in no_accuracy
    with pytest.raises(ValueError, match="must match"):
        losses.sft_loss_from_logprobs(jnp.zeros((3, 5)), mask)


# ---------------------------------------------------------------------------------------------
# group_advantages, unlikeliness_rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_advantages_matches_reference(scale, group_size):
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=8 * group_size).astype(np.float32)
    rewards[:group_size] = 0.5  # one group of equal rewards
    adv, aux = losses.group_advantages(jnp.asarray(rewards), group_size, scale=scale)
    expect = ref.group_advantages(rewards, group_size, scale)
    np.testing.assert_allclose(adv, expect, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[:group_size] == 0)
    if group_size == 1:
        assert np.all(np.asarray(adv) == 0)
    np.testing.assert_allclose(aux["reward_std"], rewards.astype(np.float64).std(ddof=1), 1e-5)


def test_group_advantages_equal_rewards_give_zeros_and_jit_matches_eager():
    adv, aux = losses.group_advantages(jnp.ones(6), 3)
    assert np.all(np.asarray(adv) == 0) and aux["frac_zero_std_groups"] == 1
    rewards = jnp.asarray([0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    jitted = jax.jit(functools.partial(losses.group_advantages, group_size=3, scale="batch"))
    np.testing.assert_allclose(
        jitted(rewards)[0], losses.group_advantages(rewards, 3, scale="batch")[0], rtol=1e-6
    )


@pytest.mark.parametrize("beta_rank", [0.0, 0.25, 1.0])
def test_unlikeliness_rewards_matches_reference(beta_rank):
    rng = np.random.default_rng(5)
    rewards = rng.integers(0, 2, size=12).astype(np.float32)
    seq_logp = rng.normal(size=12).astype(np.float32) * 5
    seq_logp[[1, 2]] = seq_logp[0]  # a three-way tie in the first group
    got = losses.unlikeliness_rewards(
        jnp.asarray(rewards), jnp.asarray(seq_logp), 4, beta_rank=beta_rank
    )
    np.testing.assert_allclose(got, ref.unlikeliness(rewards, seq_logp, 4, beta_rank), rtol=1e-6)


def test_unlikeliness_rewards_favours_the_unlikely():
    rewards = jnp.ones(4)
    got = losses.unlikeliness_rewards(rewards, jnp.asarray([-1.0, -9.0, -3.0, -5.0]), 4)
    np.testing.assert_allclose(got, [1 - 0.25 * 3 / 4, 1.0, 1 - 0.25 * 2 / 4, 1 - 0.25 / 4])


# ---------------------------------------------------------------------------------------------
# grpo_loss


def _grpo_inputs(rng, b=4, l=6, per_token_adv=False):
    logp = rng.normal(size=(b, l)) * 0.5 - 2
    old = logp + rng.normal(size=(b, l)) * 0.3  # ratios spread on both sides of the clip range
    ref_logp = logp + rng.normal(size=(b, l)) * 0.3
    adv = rng.normal(size=(b, l) if per_token_adv else (b,))
    return logp, old, ref_logp, adv, _mask(rng, b, l)


GRPO_CASES = [
    dict(loss_type=lt, importance=imp)
    for lt in losses.LOSS_TYPES
    for imp in losses.IMPORTANCE_LEVELS
] + [
    dict(loss_type="dr_grpo", max_len=10),
    dict(loss_type="dapo", eps_low=0.2, eps_high=0.28),
    dict(loss_type="grpo", kl_beta=0.04),
    dict(loss_type="dapo", kl_beta=0.1, importance="sequence", eps_low=0.05),
]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize(
    "case", GRPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_grpo_loss_matches_reference(case, per_token_adv, jit):
    rng = np.random.default_rng(6)
    logp, old, ref_logp, adv, mask = _grpo_inputs(rng, per_token_adv=per_token_adv)
    fn = functools.partial(losses.grpo_loss, **case)
    if jit:
        fn = jax.jit(fn)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, aux = fn(f32(logp), f32(old), f32(adv), f32(mask), ref_logp=f32(ref_logp))
    kw = {k.replace("kl_beta", "beta"): v for k, v in case.items()}
    np.testing.assert_allclose(
        loss, ref.grpo(logp, old, adv, mask, ref=ref_logp, **kw), rtol=2e-5, atol=1e-6
    )
    # aux: token-level ratio and clip statistics (token importance only, where they are simple)
    if case.get("importance", "token") == "token":
        m = mask.astype(bool)
        ratio = np.exp(logp - old)
        a = np.broadcast_to(adv[:, None], logp.shape) if adv.ndim == 1 else adv
        eps_high = case.get("eps_high", case.get("eps_low", 0.2))
        low = (ratio < 1 - case.get("eps_low", 0.2)) & (a < 0)
        np.testing.assert_allclose(aux["ratio_mean"], ratio[m].mean(), rtol=1e-5)
        np.testing.assert_allclose(aux["clip_frac_low"], low[m].mean(), atol=1e-6)
        np.testing.assert_allclose(
            aux["clip_frac_high"], ((ratio > 1 + eps_high) & (a > 0))[m].mean(), atol=1e-6
        )
        gap = ref_logp - logp
        np.testing.assert_allclose(aux["kl"], (np.exp(gap) - gap - 1)[m].mean(), rtol=1e-5)


@pytest.mark.parametrize(
    "case", GRPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
def test_grpo_loss_gradient_matches_finite_differences(case):
    """For importance="sequence" this is also GSPO's gradient: the finite differences see only
    the loss's value, which is the sequence-level objective, not the stop-gradient rewrite."""
    rng = np.random.default_rng(7)
    logp, old, ref_logp, adv, mask = _grpo_inputs(rng, b=3, l=4)
    with jax.enable_x64(True):
        old, ref_logp, adv, mask = map(jnp.asarray, (old, ref_logp, adv, mask))
        fn = lambda x: losses.grpo_loss(x, old, adv, mask, ref_logp=ref_logp, **case)[0]
        ref.assert_grad_matches_finite_differences(fn, logp)


def test_grpo_loss_ignores_padding():
    rng = np.random.default_rng(8)
    logp, old, ref_logp, adv, mask = _grpo_inputs(rng)
    pad = mask == 0
    dirty = [x.copy() for x in (logp, old, ref_logp)]
    for x in dirty:
        x[pad] = rng.choice([1e30, -1e30, np.inf, -np.inf, np.nan], size=pad.sum())

    def value_and_grad(lp, o, r, importance):
        fn = lambda x: losses.grpo_loss(x, jnp.asarray(o), jnp.asarray(adv), jnp.asarray(mask),
                                        ref_logp=jnp.asarray(r), kl_beta=0.1, importance=importance)[0]  # fmt: skip
        return jax.value_and_grad(fn)(jnp.asarray(lp, jnp.float32))

    for importance in losses.IMPORTANCE_LEVELS:
        clean = value_and_grad(logp, old, ref_logp, importance)
        loss, grad = value_and_grad(*dirty, importance)
        np.testing.assert_array_equal(loss, clean[0])
        np.testing.assert_array_equal(grad, clean[1])
        assert np.all(np.asarray(grad)[pad] == 0)


def test_grpo_on_policy_gradient_is_advantage_weighted_score():
    """At old = logp the ratio is 1, clipping is inactive, and ∇ = −Σ m A ∇logp / normalizer."""
    rng = np.random.default_rng(9)
    logp, _, _, adv, mask = _grpo_inputs(rng)
    grad = jax.grad(lambda x: losses.grpo_loss(x, x, jnp.asarray(adv), jnp.asarray(mask))[0])(
        jnp.asarray(logp, jnp.float32)
    )
    np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance="sentence"), "importance"),
        (dict(eps_low=-0.1), "eps_low"),
        (dict(eps_low=1.5), "eps_low"),
        (dict(eps_high=-0.2), "eps_high"),
        (dict(kl_beta=-1.0), "kl_beta"),
        (dict(kl_beta=0.1), "ref_logp"),
        (dict(loss_type="dr_grpo", max_len=2), "max_len"),
        (dict(loss_type="grpo", max_len=8), "max_len"),
    ],
)
def test_grpo_loss_rejects_bad_arguments(kwargs, message):
    x = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=message):
        losses.grpo_loss(x, x, jnp.zeros(2), x, **kwargs)


def test_grpo_loss_rejects_bad_shapes():
    x = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="advantages"):
        losses.grpo_loss(x, x, jnp.zeros(3), x)
    with pytest.raises(ValueError, match="old_logp"):
        losses.grpo_loss(x, jnp.zeros((2, 5)), jnp.zeros(2), x)


# ---------------------------------------------------------------------------------------------
# bad rewards


def test_rewards_not_divisible_by_group_size():
    with pytest.raises(ValueError, match="not divisible"):
        losses.group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="not divisible"):
        losses.unlikeliness_rewards(jnp.zeros(6), jnp.zeros(6), 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rewards_raise(bad):
    rewards = np.zeros(4, np.float32)
    rewards[2] = bad
    for r in (rewards, jnp.asarray(rewards)):
        with pytest.raises(ValueError, match=r"non-finite rewards at rows \[2\]"):
            losses.group_advantages(r, 2)
        with pytest.raises(ValueError, match="non-finite"):
            losses.unlikeliness_rewards(r, np.zeros(4, np.float32), 2)


def test_non_finite_rewards_under_jit_poison_only_their_group():
    """Documented behaviour: traced rewards cannot be checked, a NaN stays in its group."""
    rewards = jnp.asarray([0.0, 1.0, np.nan, 1.0])
    adv, _ = jax.jit(lambda r: losses.group_advantages(r, 2))(rewards)
    assert np.all(np.isfinite(adv[:2])) and np.all(np.isnan(adv[2:]))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(scale="rank"), "scale"), (dict(eps=0.0), "eps"), (dict(group_size=0), "group_size")],
)
def test_group_advantages_rejects_bad_arguments(kwargs, message):
    kwargs = dict(group_size=2) | kwargs
    with pytest.raises(ValueError, match=message):
        losses.group_advantages(jnp.zeros(4), **kwargs)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate",
                                  "sequence_mask"])  # fmt: skip
def test_importance_correction_matches_the_reference(mode, loss_type):
    """grpo_loss(sampling_logp=...): TRL's four modes of π_old/q, values and gradients against
    the float64 reference (its gradient by central differences), with a KL term beside."""
    rng = np.random.default_rng(7)
    b, l = 6, 5
    old = rng.normal(-1.5, 0.5, (b, l))
    logp = old + rng.normal(0, 0.1, (b, l))
    sampling = old + rng.normal(0, 0.45, (b, l))  # weights from ~0.3 to ~5: some cut
    adv = rng.normal(size=b)
    mask = np.ones((b, l), np.int32)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    ref_logp = old + rng.normal(0, 0.2, (b, l))
    kw = dict(loss_type=loss_type, is_mode=mode, is_min=0.5, is_max=2.0)
    with jax.enable_x64(True):
        def fn(x):
            return losses.grpo_loss(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                    ref_logp=jnp.asarray(ref_logp), kl_beta=0.05,
                                    sampling_logp=jnp.asarray(sampling), **kw)  # fmt: skip

        loss, aux = fn(jnp.asarray(logp))
        grad = np.asarray(jax.grad(lambda x: fn(x)[0])(jnp.asarray(logp)))

    def reference(x):
        return ref.grpo(x, old, adv, mask, ref=ref_logp, beta=0.05, sampling=sampling, **kw)

    np.testing.assert_allclose(float(loss), reference(logp), rtol=1e-10)
    step, numeric = 1e-6, np.zeros_like(logp)
    for i in np.ndindex(logp.shape):
        e = np.zeros_like(logp)
        e[i] = step
        numeric[i] = (reference(logp + e) - reference(logp - e)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    assert 0 < aux["is_corrected_frac"] < 1  # the bounds cut some weights, not all
    ratios = np.exp(old - sampling)[mask == 1] if mode.startswith("token") else None
    if ratios is not None:
        np.testing.assert_allclose([aux["is_ratio_min"], aux["is_ratio_max"]],
                                   [ratios.min(), ratios.max()], rtol=1e-10)  # fmt: skip


def test_importance_correction_is_a_no_op_when_the_sampler_drew_from_the_policy():
    rng = np.random.default_rng(8)
    logp, old = rng.normal(-1, 0.3, (4, 6)), rng.normal(-1, 0.3, (4, 6))
    args = (jnp.asarray(logp), jnp.asarray(old), jnp.asarray(rng.normal(size=4)),
            jnp.ones((4, 6)))  # fmt: skip
    plain, _ = losses.grpo_loss(*args)
    for mode in ("token_mask", "sequence_truncate"):
        same, aux = losses.grpo_loss(*args, sampling_logp=jnp.asarray(old), is_mode=mode)
        np.testing.assert_allclose(same, plain, rtol=1e-6)
        assert float(aux["is_ratio_min"]) == float(aux["is_ratio_max"]) == 1.0


@pytest.mark.parametrize("kw, match", [
    (dict(is_mode="tokens"), "is_mode must be one of"),
    (dict(is_max=0.0), "is_max must be > 0"),
    (dict(is_min=4.0), "is_min must lie in"),
])  # fmt: skip
def test_importance_correction_refuses_bad_settings(kw, match):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=match):
        losses.grpo_loss(x, x, jnp.zeros(2), jnp.ones((2, 3)), sampling_logp=x, **kw)
