"""α-DPG (jaxpost.dpg): pseudo-rewards, the partition estimate and the leave-one-out baseline
against a float64 loop over the paper's formulas; the loop's base forward against the sampler."""

import math

import jax
import numpy as np
import pytest

from jaxpost import dpg, loops, models, train
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig
from jaxpost.tokenizers import CharTokenizer


def _reference(pol, base, b, G, alpha, clip=dpg.DEFAULT_CLIP, z_empty=dpg.DEFAULT_Z_EMPTY):
    """The released code's estimator, one group and one sample at a time, in float64."""
    R, A, Z = [], [], []
    for g in range(len(pol) // G):
        rows = range(g * G, (g + 1) * G)
        z = sum(b[i] * math.exp(base[i] - pol[i]) for i in rows) / G
        z = min(z, 1.0) if z > 0 else z_empty
        r = [min((b[i] * math.exp(base[i] - pol[i]) / z) ** (1 - alpha) - 1, clip)
             if b[i] > 0 else -1.0 for i in rows]  # fmt: skip
        R += r
        A += [r[j] - (sum(r) - r[j]) / (G - 1) for j in range(G)]
        Z += [z] * G
    return np.asarray(R), np.asarray(A), np.log(Z)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.9])
def test_pseudo_rewards_and_advantages_match_the_formulas(alpha):
    rng = np.random.default_rng(0)
    G = 4
    pol = rng.uniform(-8, -2, 5 * G)
    base = pol + rng.normal(0, 1.0, 5 * G)
    b = np.array([1, 0, 1, 0,  0, 0, 0, 0,  1, 1, 1, 1,  0.5, 0, 0, 2,  1, 0, 0, 0], float)
    base[8:12] = pol[8:12] + 3.0  # Ẑ > 1 before the clamp
    base[16] = pol[16] + 6.0  # a weight whose pseudo-reward is clipped (alpha < 0.5)
    with jax.enable_x64(True):
        r, log_z = dpg.pseudo_rewards(pol, base, b, G, alpha=alpha)
        adv = dpg.leave_one_out(r, G)
    want_r, want_a, want_z = _reference(pol, base, b, G, alpha)
    np.testing.assert_allclose(np.asarray(r), want_r, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(adv), want_a, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(log_z), want_z, rtol=1e-12)
    assert np.all(np.asarray(r)[4:8] == -1) and np.all(np.asarray(adv)[4:8] == 0)  # no verified
    assert np.asarray(log_z)[8] == 0.0  # clamped at Ẑ = 1
    if alpha == 0:  # plain DPG: the importance weight a·b/(Ẑπ) minus 1
        assert np.asarray(r)[16] == dpg.DEFAULT_CLIP
    a32, _ = dpg.advantages(pol, base, b, G, alpha=alpha)  # float32, as the loop uses it
    np.testing.assert_allclose(a32, want_a, rtol=2e-5, atol=2e-5)


def test_alpha_zero_is_the_dpg_weight_and_alpha_orders_the_update():
    """At the start (π = a) a verified sample's pseudo-reward is (1/p)^(1-α) - 1 with p the
    group's pass rate: larger for rarer successes, flatter as α grows toward reverse KL."""
    G = 4
    lp = np.full(2 * G, -5.0)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 0], float)
    for alpha in (0.0, 0.5):
        r, log_z = dpg.pseudo_rewards(lp, lp, b, G, alpha=alpha)
        np.testing.assert_allclose(np.exp(np.asarray(log_z)), [0.25] * G + [0.5] * G, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(r)[[0, 4]], [4 ** (1 - alpha) - 1,
                                                           2 ** (1 - alpha) - 1], rtol=1e-6)  # fmt: skip
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
            dpg.pseudo_rewards(lp, lp, b, G, alpha=bad)


@pytest.mark.parametrize("verified", [1.0, 0.0])
def test_the_loop_scores_rollouts_with_the_base_as_the_sampler_did(verified, tmp_path):
    """Step 1 samples from the base itself, so with every rollout verified each weight a·b/π is
    1 and log Ẑ = 0 (the base's forward pass and the sampler agree); with none, Ẑ = z_empty."""
    tok = CharTokenizer()
    config = models.get_config("tiny", vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    params = models.init(config, seed=0)
    source = PromptSource(prompts=[tok.encode("ab"), tok.encode("cde")],
                          reward=lambda i, c: verified, eos_id=tok.eos_id, pad_id=tok.pad_id)  # fmt: skip
    result = loops.run_alpha_dpg(
        config, params, source, train.OptimConfig(learning_rate=1e-3, warmup_steps=0,
                                                  total_steps=1),
        LoopConfig(steps=1, batch_size=2, workdir=str(tmp_path)),
        SamplingConfig(group_size=4, max_new_tokens=6), alpha=0.25)  # fmt: skip
    (row,) = result.history
    want = 0.0 if verified else math.log(dpg.DEFAULT_Z_EMPTY)
    assert row["dpg_log_z"] == pytest.approx(want, abs=2e-4)
    assert row["dpg_pseudo_reward"] == pytest.approx(0.0 if verified else -1.0, abs=2e-4)
