"""GRPO practice (jaxpost.shaping): DAPO's overlong penalty and truncation mask, the high-entropy
token mask, dynamic sampling (never an all-equal group trained on), each against a direct
reading of its paper's definition; and the loops that use them, end to end on a tiny model."""

import math

import numpy as np
import pytest

from jaxpost import loops, models, shaping, train
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size, n_layers=1)
PROMPTS = [TOK.encode(f"{i}+{i}=", add_bos=True) for i in range(12)]


def _parity_reward(i, completion):
    """A reward an untrained model earns about half the time, differently per sample."""
    return float(sum(completion) % 2)


SOURCE = loops.PromptSource(PROMPTS, reward=_parity_reward, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
SAMPLING = loops.SamplingConfig(group_size=2, max_new_tokens=6)


def _dapo_overlong(length, max_len, cache, truncated):
    """DAPO (Yu et al., 2025), eq. 13, with a truncated completion counted as longer than L_max."""
    if truncated:
        return -1.0
    if length <= max_len - cache:
        return 0.0
    return ((max_len - cache) - length) / cache


def test_overlong_penalty_is_dapos_soft_punishment():
    lengths = np.arange(0, 17)
    cut = lengths == 16
    got = shaping.overlong_penalty(lengths, cut, 16, 4, factor=0.5)
    want = [0.5 * _dapo_overlong(n, 16, 4, t) for n, t in zip(lengths, cut)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[12] == 0 and got[13] == -0.125 and got[16] == -0.5
    np.testing.assert_array_equal(shaping.overlong_penalty(lengths, cut, 16, 0), 0)


def test_truncated_means_the_budget_ran_out_before_the_stop_token():
    eos = 2
    got = shaping.truncated([[5, 6, 7], [5, 6, eos], [5, eos], [5]], 3, eos)
    np.testing.assert_array_equal(got, [True, False, False, False])
    np.testing.assert_array_equal(shaping.truncated([[5, 6, 7]], 3, None), [True])


def test_entropy_top_mask_keeps_the_highest_entropy_fraction():
    rng = np.random.default_rng(0)
    entropy = rng.uniform(0, 3, (6, 10))
    mask = (np.arange(10)[None] < rng.integers(1, 11, 6)[:, None]).astype(np.float32)
    entropy[mask == 0] = 99.0  # padding with huge entropy must never be chosen
    for frac in (0.2, 0.5, 0.01):
        got = shaping.entropy_top_mask(entropy, mask, frac)
        n = int(mask.sum())
        assert got.sum() == math.ceil(frac * n)
        assert np.all(got <= mask)
        kept, dropped = entropy[got > 0], entropy[(mask > 0) & (got == 0)]
        assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(shaping.entropy_top_mask(entropy, mask, 1.0), mask)
    ties = shaping.entropy_top_mask(np.ones((2, 3)), np.ones((2, 3)), 0.2)
    assert ties.sum() == 6  # every token tied with the threshold is kept


def test_informative_groups():
    got = shaping.informative_groups([1, 1, 0, 1, 0, 0, 0.5, 0.25], 2)
    np.testing.assert_array_equal(got, [False, True, False, True])


def test_shaping_settings_are_checked():
    for bad in (dict(max_rounds=0), dict(overlong_buffer=-1), dict(entropy_top_frac=0.0),
                dict(entropy_top_frac=1.5), dict(overlong_factor=float("nan"))):  # fmt: skip
        with pytest.raises(ValueError):
            shaping.Shaping(**bad)
    with pytest.raises(ValueError, match="overlong_buffer"):
        shaping.Shaping(overlong_buffer=6).check_budget(6)


@pytest.fixture(scope="module")
def params():
    return models.init(CONFIG, seed=0)


def test_dynamic_sampling_never_trains_on_an_all_equal_group(params):
    settings = shaping.Shaping(dynamic_sampling=True, max_rounds=4)
    rounds, fillers = [], []
    for step in range(1, 7):
        r, info = shaping.collect(CONFIG, params, SOURCE, SAMPLING, settings, batch_size=6,
                                  seed=0, step=step)  # fmt: skip
        batch, extra = shaping.grpo_batch(SOURCE, r, SAMPLING, settings)
        rewards = r.rewards.reshape(-1, 2)
        trained = np.asarray(batch.loss_mask).reshape(6, 2, -1).sum(axis=(1, 2)) > 0
        equal = rewards[:, 0] == rewards[:, 1]
        assert not np.any(trained & equal), (rewards, trained)
        # the informative groups come first; filler only when the rounds ran out
        assert np.all(trained == ~equal) and np.all(np.diff(trained.astype(int)) <= 0)
        assert info["ds_filler_groups"] == equal.sum()
        np.testing.assert_array_equal(np.asarray(batch.advantages)[np.repeat(equal, 2)], 0)
        # the batch's rows are consistent: each completion is its own rollout's
        for row, comp in enumerate(r.completions):
            np.testing.assert_array_equal(np.asarray(r.batch.completion)[row, : len(comp)], comp)
            assert _parity_reward(r.problems[row], comp) == r.rewards[row]
        rounds.append(info["ds_rounds"])
        fillers.append(info["ds_filler_groups"])
        assert 0 < info["ds_informative_frac"] <= 1 and 0 <= info["pass_rate"] <= 1
    assert max(rounds) > 1  # with G = 2 about half the groups are all-equal: refills happen
    # without dynamic sampling: one round, every group trained, no loss mask at all
    r, info = shaping.collect(CONFIG, params, SOURCE, SAMPLING, shaping.Shaping(), batch_size=6,
                              seed=0, step=1)  # fmt: skip
    batch, _ = shaping.grpo_batch(SOURCE, r, SAMPLING, shaping.Shaping())
    assert batch.loss_mask is None and "ds_rounds" not in info


def test_truncation_mask_and_overlong_penalty_in_the_batch(params):
    settings = shaping.Shaping(mask_truncated=True, overlong_buffer=2, overlong_factor=1.0)
    r, _ = shaping.collect(CONFIG, params, SOURCE, SAMPLING, settings, batch_size=6, seed=0,
                           step=1)  # fmt: skip
    batch, extra = shaping.grpo_batch(SOURCE, r, SAMPLING, settings, advantage_scale="none")
    cut = shaping.truncated(r.completions, SAMPLING.max_new_tokens, TOK.eos_id)
    assert 0 < cut.sum() < len(cut), "the tiny model should both finish and run out"
    assert extra["truncated_frac"] == pytest.approx(cut.mean())
    loss_mask = np.asarray(batch.loss_mask)
    assert np.all(loss_mask[cut] == 0)
    np.testing.assert_array_equal(loss_mask[~cut], np.asarray(batch.completion_mask)[~cut])
    lengths = np.asarray([len(c) for c in r.completions])
    shaped = r.rewards + np.asarray([_dapo_overlong(n, 6, 2, t) for n, t in zip(lengths, cut)])
    want = (shaped.reshape(-1, 2) - shaped.reshape(-1, 2).mean(1, keepdims=True)).reshape(-1)
    np.testing.assert_allclose(np.asarray(batch.advantages), want, atol=1e-6)


def test_high_entropy_mask_in_the_batch(params):
    settings = shaping.Shaping(entropy_top_frac=0.2)
    r, _ = shaping.collect(CONFIG, params, SOURCE, SAMPLING, settings, batch_size=6, seed=0,
                           step=1)  # fmt: skip
    batch, extra = shaping.grpo_batch(SOURCE, r, SAMPLING, settings)
    mask = np.asarray(batch.completion_mask)
    np.testing.assert_array_equal(np.asarray(batch.loss_mask),
                                  shaping.entropy_top_mask(r.entropy, mask, 0.2))  # fmt: skip
    assert extra["trained_token_frac"] == pytest.approx(np.asarray(batch.loss_mask).sum() / mask.sum())
    assert 0.2 <= extra["trained_token_frac"] < 0.35


@pytest.mark.slow
def test_grpo_and_sampled_opd_loops_with_every_practice(params):
    optim = train.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=3)
    loop = loops.LoopConfig(steps=3, batch_size=4, progress=False)
    every = shaping.Shaping(dynamic_sampling=True, mask_truncated=True, overlong_buffer=2,
                            entropy_top_frac=0.5)  # fmt: skip
    result = loops.run_grpo(CONFIG, params, SOURCE, optim, loop, SAMPLING, shaping=every,
                            entropy_coef=0.01)  # fmt: skip
    last = result.history[-1]
    for key in ("ds_rounds", "ds_informative_frac", "ds_filler_groups", "truncated_frac",
                "trained_token_frac", "entropy", "reward", "pass_rate"):  # fmt: skip
        assert key in last and np.isfinite(last[key]), key
    teacher = models.init(CONFIG, seed=3)
    for with_reward in (False, True):
        result = loops.run_sampled_opd(CONFIG, params, CONFIG, teacher, SOURCE, optim, loop,
                                       SAMPLING, coef=1.0, with_reward=with_reward)  # fmt: skip
        last = result.history[-1]
        # (a sampled estimate of KL(π_S ‖ π_T): its sign on one small batch is not fixed)
        assert np.isfinite(last["sampled_reverse_kl"]) and np.isfinite(last["loss"])
        assert "pass_rate" in last


def test_ema_tracker_is_the_moving_average_of_the_updated_parameters():
    import jax
    import jax.numpy as jnp
    import optax

    from jaxpost import teachers

    tx = optax.chain(optax.sgd(0.1), teachers.ema_tracker(0.9))
    params = {"w": jnp.asarray([1.0, -2.0])}
    state = tx.init(params)
    want_ema, theta = np.asarray([1.0, -2.0]), np.asarray([1.0, -2.0])
    for g in ([1.0, 0.5], [-0.2, 0.3], [0.0, 1.0]):
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        theta = theta - 0.1 * np.asarray(g)
        want_ema = 0.9 * want_ema + 0.1 * theta
        np.testing.assert_allclose(np.asarray(teachers.ema_of(state)["w"]), want_ema, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(params["w"]), theta, rtol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        teachers.ema_tracker(1.0)
    assert jax is not None


@pytest.mark.slow
def test_self_teachers_live_and_ema(params):
    """OPSD with the student itself as teacher: an EMA at decay 0 is the live policy (same run),
    a frozen teacher (the start) differs from the live one once the student moved."""
    priv = [TOK.encode(f"{i}+{i}={2 * i}. {i}+{i}=", add_bos=True) for i in range(12)]
    source = loops.PromptSource(PROMPTS, teacher_prompts=priv, eos_id=TOK.eos_id,
                                pad_id=TOK.pad_id)  # fmt: skip
    optim = train.OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=4)
    loop = loops.LoopConfig(steps=4, batch_size=4, progress=False)
    from jaxpost import losses

    runs = {}
    for mode, decay in (("frozen", 0.5), ("live", 0.5), ("ema", 0.0), ("ema", 0.9)):
        r = loops.run_opd(CONFIG, params, CONFIG, params, source, losses.opd_kl(1.0), optim, loop,
                          SAMPLING, self_teacher=mode, ema_decay=decay)  # fmt: skip
        runs[mode, decay] = [h["loss"] for h in r.history]
    live, ema0 = runs["live", 0.5], runs["ema", 0.0]
    np.testing.assert_allclose(ema0, live, rtol=1e-5)
    assert runs["frozen", 0.5][0] == pytest.approx(live[0], rel=1e-6)  # same teacher at step 1
    assert runs["frozen", 0.5][-1] != pytest.approx(live[-1], rel=1e-3)
    assert runs["ema", 0.9][-1] != pytest.approx(live[-1], rel=1e-3)
    with pytest.raises(ValueError, match="self_teacher must be one of"):
        loops.run_opd(CONFIG, params, CONFIG, params, source, losses.opd_kl(1.0), optim, loop,
                      SAMPLING, self_teacher="best")  # fmt: skip
