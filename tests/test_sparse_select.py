"""Sparse policy selection (jaxpost.sparse_select): the decision loss against float64 numpy and
finite differences, the pool's selection and advantages, the epochs' batches, the whole run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_losses_refs as ref

from jaxpost import models, sparse_select, train
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig
from jaxpost.tokenizers import CharTokenizer


def _reference(base, logits, tokens, mask, adv, tau, kl_coef):
    """The loss one sequence at a time, in float64."""
    total = 0.0
    for i in range(len(tokens)):
        dec, anchor = [], []
        for t in range(tokens.shape[1]):
            if not mask[i, t]:
                continue
            pb = np.exp(base[i, t] - base[i, t].max())
            pb /= pb.sum()
            lp = logits[i, t] - logits[i, t].max()
            lp = lp - np.log(np.exp(lp).sum())
            if -(pb * np.log(pb)).sum() > tau:
                dec.append(-adv[i] * lp[tokens[i, t]])
            else:
                anchor.append((pb * (np.log(pb) - lp)).sum())
        total += (np.mean(dec) if dec else 0.0) + kl_coef * (np.mean(anchor) if anchor else 0.0)
    return total / len(tokens)


def _inputs(seed=0, n=4, m=5, v=7):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, m, v)) * rng.uniform(0.2, 3.0, size=(n, m, 1))  # mixed entropies
    logits = base + rng.normal(size=base.shape) * 0.5
    tokens = rng.integers(0, v, (n, m))
    mask = (np.arange(m)[None] < np.array([m, 3, 1, 4])[:, None]).astype(np.float64)
    adv = np.array([1.5, -1.0, 2.5, -0.3])
    return base, logits, tokens, mask, adv


def test_decision_loss_matches_float64_and_finite_differences():
    base, logits, tokens, mask, adv = _inputs()
    tau, kl_coef = 1.2, 0.2
    with jax.enable_x64(True):
        loss, aux = sparse_select.decision_loss(jnp.asarray(base), jnp.asarray(logits), tokens,
                                                mask, adv, tau=tau, kl_coef=kl_coef)  # fmt: skip
        np.testing.assert_allclose(float(loss), _reference(base, logits, tokens, mask, adv, tau,
                                                           kl_coef), rtol=1e-12)  # fmt: skip
        assert 0 < float(aux["decision_frac"]) < 1  # both kinds of positions are exercised
        fn = lambda x: sparse_select.decision_loss(jnp.asarray(base), x, tokens, mask, adv,
                                                   tau=tau, kl_coef=kl_coef)[0]  # fmt: skip
        ref.assert_grad_matches_finite_differences(fn, logits)
    loss32, _ = sparse_select.decision_loss(jnp.asarray(base, jnp.float32),
                                            jnp.asarray(logits, jnp.float32), tokens, mask, adv,
                                            tau=tau, kl_coef=kl_coef)  # fmt: skip
    assert float(loss32) == pytest.approx(float(loss), rel=1e-5)


def test_at_the_base_only_the_decisions_pull():
    """With the policy equal to the base the anchor is 0 and its gradient too; the decision
    term's gradient is A·(p - onehot) at decision positions and nothing elsewhere."""
    base, _, tokens, mask, adv = _inputs(1)
    tau = 1.2
    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(lambda x: sparse_select.decision_loss(
            jnp.asarray(base), x, tokens, mask, adv, tau=tau)[0])(jnp.asarray(base)))  # fmt: skip
    p = np.exp(base - base.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    decision = (-(p * np.log(p)).sum(-1) > tau) & (mask > 0)
    counts = np.maximum(decision.sum(1), 1)
    want = (p - np.eye(base.shape[-1])[tokens]) * (adv / counts / len(tokens))[:, None, None]
    np.testing.assert_allclose(grad, np.where(decision[..., None], want, 0.0), atol=1e-12)


def test_pool_selection_and_advantages():
    rewards = np.array([0, 0, 0, 0,  1, 0, 0, 0,  1, 1, 0, 0,  1, 1, 1, 1,  1, 1, 1, 0], float)
    groups, mixed = sparse_select.select_groups(rewards, 4, keep=2)
    assert mixed == 3 and groups == [2, 1]  # pass rate 0.5 first, then 0.25 (before 0.75)
    assert sparse_select.select_groups(rewards[:4], 4, keep=2) == ([0], 0)  # none mixed
    adv = sparse_select.group_advantages([1, 0, 0, 0, 0, 0, 0, 0], 4)  # population std
    np.testing.assert_allclose(adv[:4], [np.sqrt(3)] + [-1 / np.sqrt(3)] * 3, rtol=1e-6)
    np.testing.assert_array_equal(adv[4:], 0)
    one_in_eight = sparse_select.group_advantages([1] + [0] * 7, 8)
    assert one_in_eight[0] == 2.5  # sqrt(7) = 2.65, clipped


def test_each_epoch_visits_every_pool_row_once():
    rows = np.concatenate([sparse_select.step_rows(10, 4, seed=3, step=s) for s in range(1, 6)])
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    np.testing.assert_array_equal(sparse_select.step_rows(10, 4, seed=3, step=2), rows[4:8])


def test_the_arm_runs_its_epochs_on_one_pool(tmp_path):
    tok = CharTokenizer()
    config = models.get_config("tiny", vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    params = models.init(config, seed=0)
    prompts = [tok.encode(s) for s in ("ab", "cde", "fg", "hij")]
    # "verified" when the first sampled token is even: mixed groups from a random model
    source = PromptSource(prompts=prompts, reward=lambda i, c: float(c[0] % 2 == 0),
                          eos_id=tok.eos_id, pad_id=tok.pad_id)  # fmt: skip
    result = sparse_select.run(
        config, params, source, train.OptimConfig(learning_rate=1e-3, warmup_steps=1,
                                                  total_steps=50),
        LoopConfig(steps=50, batch_size=1, workdir=str(tmp_path)),
        SamplingConfig(group_size=4, max_new_tokens=5), tau=0.0, problems=4, keep=3,
        epochs=2.0)  # fmt: skip
    h = result.history
    kept = h[0]["pool_problems"]
    assert 1 <= kept <= 3 and h[0]["pool_mixed_problems"] >= kept
    assert len(h) == 2 * kept  # two epochs of one group (4 rows) per step, not 50 steps
    assert all(r["decision_frac"] == 1.0 for r in h)  # tau 0: every position decides
    assert np.isfinite([r["loss"] for r in h]).all()
    with pytest.raises(ValueError, match="tau >= 0"):
        sparse_select.run(config, params, source, train.OptimConfig(), LoopConfig(),
                          SamplingConfig(), tau=-1.0)  # fmt: skip
