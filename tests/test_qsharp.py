"""Q♯ (jaxpost.qsharp): the soft Q against float64, the value regression's loss and gradient, the
teacher-forced value and guided logits against direct unpadded forwards, the guided sampler
(Q ≡ 0 draws the plain top-k sampler's tokens; its logprobs are the teacher-forced guided
policy's), and the value model's training loop with its resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import data, evaluate, models, qsharp, rollouts, sampler, train
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig
from jaxpost.tasks.addition import Addition
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size, eos_id=TOK.eos_id)
BASE = models.init(CONFIG, seed=0)
PROMPTS = [TOK.encode(s, add_bos=True) for s in ("ab", "cdef", "g")]
K = 5


def _value(bias=0.3, scale=0.5, seed=1):
    """An untrained value model (not the base: its own transformer) with a nonzero head."""
    v = qsharp.init_value(models.init(CONFIG, seed=seed), bias=bias)
    v["head"]["w"] = scale * jax.random.normal(jax.random.key(seed), v["head"]["w"].shape)
    return v


def _batch(seed=0, N=3, P=5, M=4):
    """A random CompletionBatch, prompts left-padded, completions right-padded, 0/1 labels."""
    rng = np.random.default_rng(seed)
    p_len, c_len = rng.integers(1, P + 1, N), rng.integers(1, M + 1, N)
    p_len[0], c_len[0] = P, M  # one row without padding
    prompt, prompt_mask = data.left_pad([rng.integers(3, 60, n).tolist() for n in p_len], P, 0)
    completion = rng.integers(3, 60, (N, M)).astype(np.int32)
    completion_mask = (np.arange(M)[None] < c_len[:, None]).astype(np.int32)
    return data.CompletionBatch(prompt_tokens=prompt, prompt_mask=prompt_mask,
                                completion=completion * completion_mask,
                                completion_mask=completion_mask,
                                advantages=(np.arange(N) % 2).astype(np.float32))  # fmt: skip


def _q64(x, eta):  # log(1 − p + p e^η) of p = σ(x), float64
    return np.logaddexp(-np.logaddexp(0, x), eta - np.logaddexp(0, -x))


def test_q_values_match_float64():
    p = np.float32([0.0, 1e-7, 0.01, 0.3, 0.5, 0.99, 1 - 1e-6, 1.0])
    x = np.float32([-40, -16, -3, -0.5, 0, 0.5, 3, 16, 40])
    for eta in (0.0, 0.5, 3.0, 10.0, 20.0, 25.0, 30.0):
        p64 = p.astype(np.float64)
        want = np.log1p(p64 * np.expm1(eta))
        np.testing.assert_allclose(qsharp.q_values(p, eta), want, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(qsharp.q_from_logits(x, eta), _q64(x.astype(np.float64), eta),
                                   rtol=2e-6, atol=1e-6)  # fmt: skip
    assert np.all(np.asarray(qsharp.q_values(p, 0.0)) == 0)  # exactly: a zero guide is inert
    assert np.all(np.asarray(qsharp.q_from_logits(x, 0.0)) == 0)
    assert float(qsharp.q_from_logits(-1e4, 10.0)) == 0.0  # p = 0
    np.testing.assert_allclose(qsharp.q_values(1.0, 30.0), 30.0)  # p = 1: Q = η


def test_value_objective_matches_float64_and_its_head_gradient_finite_differences():
    batch, value = _batch(), _value()
    objective = jax.jit(qsharp.value_objective(CONFIG))
    loss, aux = objective(value, batch)
    x = qsharp.value_logits(CONFIG, value, batch.prompt_tokens, batch.prompt_mask,
                            batch.completion, batch.completion_mask)  # fmt: skip
    x = np.asarray(x, np.float64)
    y, m = batch.advantages[:, None].astype(np.float64), batch.completion_mask.astype(np.float64)
    bce = -(y * -np.logaddexp(0, -x) + (1 - y) * -np.logaddexp(0, x))
    want = np.mean((bce * m).sum(1) / m.sum(1))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["value_acc"], (((x > 0) == (y > 0.5)) * m).sum() / m.sum(),
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(aux["label_mean"], y.mean(), rtol=1e-6)
    # The head's gradient along random directions against central differences. float32 all
    # through (the model computes in float32): eps = 1e-2 keeps rounding ~1e-5 of the slope.
    grads = jax.grad(lambda v: objective(v, batch)[0])(value)["head"]
    rng = np.random.default_rng(0)
    eps = 1e-2
    def loss_at(u, s):  # the loss with the head moved by s·eps·u
        head = jax.tree.map(lambda h, d: h + s * eps * d, value["head"], u)
        return float(objective({**value, "head": head}, batch)[0])

    for _ in range(3):
        u = {"w": rng.normal(size=grads["w"].shape).astype(np.float32),
             "b": np.float32(rng.normal())}  # fmt: skip
        fd = (loss_at(u, 1) - loss_at(u, -1)) / (2 * eps)
        analytic = float(np.sum(grads["w"] * u["w"]) + grads["b"] * u["b"])
        np.testing.assert_allclose(fd, analytic, rtol=2e-3, atol=1e-5)


def _real(batch, n):
    return batch.prompt_tokens[n][batch.prompt_mask[n] > 0].tolist()


def test_value_logits_equal_a_forward_per_row_and_prefix():
    batch, value = _batch(seed=1), _value()
    got = np.asarray(qsharp.value_logits(CONFIG, value, batch.prompt_tokens, batch.prompt_mask,
                                         batch.completion, batch.completion_mask))  # fmt: skip
    forward = jax.jit(lambda v, t: qsharp.value_head(models.hidden_states(CONFIG, v["model"], t),
                                                     v["head"]))  # fmt: skip
    for n in range(batch.rows):
        for t in range(int(batch.completion_mask[n].sum())):
            tokens = _real(batch, n) + batch.completion[n, : t + 1].tolist()
            want = forward(value, jnp.asarray([tokens]))[0, -1]
            np.testing.assert_allclose(got[n, t], want, atol=1e-5, err_msg=(n, t))


def test_guided_logits_equal_a_direct_loop_and_are_the_truncated_base_at_q_zero():
    batch, value, eta = _batch(seed=2, N=2, M=3), _value(), 2.5
    args = (batch.prompt_tokens, batch.prompt_mask, batch.completion, batch.completion_mask)
    got = np.asarray(qsharp.guided_logits(CONFIG, BASE, value, *args, eta=eta, top_k=K))
    forward = jax.jit(lambda v, t: qsharp.value_head(models.hidden_states(CONFIG, v["model"], t),
                                                     v["head"]))  # fmt: skip
    base_logits = jax.jit(lambda t: models.apply(CONFIG, BASE, t))
    for n in range(batch.rows):
        for t in range(int(batch.completion_mask[n].sum())):
            prefix = _real(batch, n) + batch.completion[n, :t].tolist()
            base = np.asarray(base_logits(jnp.asarray([prefix]))[0, -1], np.float64)
            top = np.argsort(-base)[:K]
            with_candidate = jnp.asarray([prefix + [int(a)] for a in top])
            x = np.asarray(forward(value, with_candidate)[:, -1], np.float64)
            assert set(np.flatnonzero(np.isfinite(got[n, t]))) == set(top.tolist()), (n, t)
            np.testing.assert_allclose(got[n, t, top], base[top] + _q64(x, eta), atol=1e-4)
    # Q ≡ 0 (η = 0): the base's logits on its top-k, −inf elsewhere.
    zero = np.asarray(qsharp.guided_logits(CONFIG, BASE, value, *args, eta=0.0, top_k=K))
    base = np.asarray(train.completion_logits(CONFIG, BASE, *args))
    kth = np.sort(base, axis=-1)[..., -K][..., None]
    np.testing.assert_allclose(zero, np.where(base >= kth, base, -np.inf), atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_zero_guide_draws_the_plain_top_k_samplers_tokens(temperature):
    kw = dict(max_new_tokens=6, temperature=temperature, eos_id=None, seed=3, num_samples=2)
    plain = sampler.generate(CONFIG, BASE, PROMPTS, top_k=K, **kw)
    for guide in (sampler.Guide(CONFIG, _value(), top_k=K, eta=0.0),
                  sampler.Guide(CONFIG, _value(bias=-1e4), top_k=K, eta=10.0)):  # fmt: skip
        out = sampler.generate(CONFIG, BASE, PROMPTS, guide=guide, with_entropy=True, **kw)
        np.testing.assert_array_equal(out.tokens, plain.tokens)
        np.testing.assert_allclose(out.sample_logprobs, plain.sample_logprobs, atol=1e-5)


@pytest.mark.parametrize("new", [6, 20])  # 20: two decode segments, both caches grown once
def test_the_guided_samplers_logprobs_are_the_teacher_forced_guided_policys(new):
    value, eta = _value(scale=2.0), 3.0
    guide = sampler.Guide(CONFIG, value, top_k=K, eta=eta)
    out = sampler.generate(CONFIG, BASE, PROMPTS, guide=guide, max_new_tokens=new,
                           temperature=0.7, eos_id=TOK.eos_id, seed=5, num_samples=2,
                           with_entropy=True)  # fmt: skip
    args = (out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
    logits = qsharp.guided_logits(CONFIG, BASE, value, *args, eta=eta, top_k=K)
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(qsharp.guided_logprobs(CONFIG, BASE, value, *args, eta=eta, top_k=K),
                               want, atol=1e-6)  # fmt: skip
    mask = np.asarray(out.mask, bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], np.asarray(want)[mask], atol=1e-4)
    entropy = -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), axis=-1)
    np.testing.assert_allclose(np.asarray(out.entropy)[mask], np.asarray(entropy)[mask], atol=1e-4)
    # The guide moves the policy: Q is not constant over the candidates.
    plain = sampler.generate(CONFIG, BASE, PROMPTS, top_k=K, max_new_tokens=new,
                             temperature=0.7, eos_id=TOK.eos_id, seed=5, num_samples=2)  # fmt: skip
    moved = np.abs(np.asarray(plain.sample_logprobs) - np.asarray(out.sample_logprobs))
    assert moved.max() > 0.05
    with pytest.raises(ValueError, match="neither top_k nor top_p"):
        sampler.generate(CONFIG, BASE, PROMPTS, guide=sampler.Guide(CONFIG, value), top_k=3,
                         max_new_tokens=2, eos_id=None, seed=0)  # fmt: skip


def test_train_value_learns_the_outcome_and_resumes(tmp_path):
    # Success: the first completion token is even; after reading it the value model can know.
    # The base samples from its top 2 so that a dozen steps see every (prompt, token) often.
    source = PromptSource(prompts=[TOK.encode(s, add_bos=True) for s in ("ab", "cde", "fg", "h")],
                          reward=lambda i, c: float(c[0] % 2 == 0), eos_id=TOK.eos_id,
                          pad_id=TOK.pad_id)  # fmt: skip
    sampling = SamplingConfig(group_size=4, max_new_tokens=4, top_k=2)
    optim = train.OptimConfig(learning_rate=3e-3, warmup_steps=0, total_steps=30)
    loop = LoopConfig(steps=12, batch_size=4, workdir=str(tmp_path), progress=False)
    result = qsharp.train_value(CONFIG, BASE, source, optim, loop, sampling)
    assert jax.tree.structure(result.params) == jax.tree.structure(qsharp.init_value(BASE))
    assert {"reward", "value_bce", "value_acc", "label_mean"} <= set(result.history[-1])
    # On fresh rollouts of the base: lower cross-entropy than the start's log 2, and the first
    # slot's value ranks successes above failures.
    r = rollouts.sample_step(CONFIG, BASE, source, sampling, batch_size=4, seed=0, step=1000)
    y = (rollouts.rewards(source, r) > 0).astype(np.float32)
    batch = r.batch.replace(advantages=y)
    objective = qsharp.value_objective(CONFIG)
    before, _ = objective(qsharp.init_value(BASE), batch)
    after, _ = objective(result.params, batch)
    np.testing.assert_allclose(before, np.log(2), rtol=1e-6)
    assert float(after) < float(before) - 0.2, (float(before), float(after))
    first = np.asarray(qsharp.value_logits(CONFIG, result.params, batch.prompt_tokens,
                                           batch.prompt_mask, batch.completion,
                                           batch.completion_mask))[:, 0]  # fmt: skip
    assert 0 < y.mean() < 1 and first[y > 0].mean() > first[y == 0].mean()
    # Resume: the same workdir with more steps starts after the saved step.
    more = qsharp.train_value(CONFIG, BASE, source, optim, LoopConfig(
        steps=13, batch_size=4, workdir=str(tmp_path), progress=False), sampling)  # fmt: skip
    assert [h["step"] for h in more.history] == [13]
    with pytest.raises(ValueError, match="reward function"):
        qsharp.train_value(CONFIG, BASE, PromptSource(prompts=source.prompts), optim, loop,
                           sampling)  # fmt: skip


def test_evaluate_sample_with_a_guide():
    task = Addition()
    problems = task.prompts("test", 2, seed=0)
    guide = sampler.Guide(CONFIG, _value(), top_k=K, eta=10.0)
    s = evaluate.sample(CONFIG, BASE, TOK, task, problems, n=2, max_new_tokens=5, guide=guide)
    assert s.tokens.shape == (4, 5) and s.answer_ok.shape == (2, 2)
    mask = s.mask.astype(bool)
    assert np.all(np.isfinite(s.logprobs[mask])) and np.all(s.logprobs[mask] <= 0)
