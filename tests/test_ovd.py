"""OVD (jaxpost.ovd): the teacher's proxy score, row replacement, and the loop at both ends of
the threshold (nothing replaced: GRPO itself; everything replaced: the teacher's samples)."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from jaxpost import loops, models, ovd, rollouts, train
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size, eos_id=TOK.eos_id)


def test_the_proxy_score_is_the_geometric_mean_probability_on_0_to_9():
    lp = np.log(np.array([[1.0, 1.0, 0.5], [0.5, 0.5, 0.5], [1e-3, 1e-3, 1.0]]))
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    want = [9, 4, 0]  # mean prob^: 1.0 → 9; 0.5 → floor(4.5); 0.01 → floor(0.09)
    np.testing.assert_array_equal(ovd.verbal_proxy(lp, mask), want)


def _source(reward=lambda i, c: float(c[0] % 2 == 0)):
    return PromptSource(prompts=[TOK.encode(s, add_bos=True) for s in ("ab", "cde", "fg")],
                        reward=reward, eos_id=TOK.eos_id, pad_id=TOK.pad_id)  # fmt: skip


def test_replaced_rows_are_the_teachers_with_the_students_logprobs():
    student, teacher = models.init(CONFIG, seed=0), models.init(CONFIG, seed=1)
    sampling = SamplingConfig(group_size=2, max_new_tokens=5)
    kw = dict(batch_size=2, seed=0, step=1)
    s = rollouts.sample_step(CONFIG, student, _source(), sampling, **kw)
    t = rollouts.sample_step(CONFIG, teacher, _source(), sampling, **kw)
    lp = np.random.default_rng(0).normal(size=t.batch.completion.shape)
    rows = np.array([True, False, False, True])
    got = ovd.replace_rows(s, t, rows, lp)
    for i, swap in enumerate(rows):
        src = t if swap else s
        np.testing.assert_array_equal(got.batch.completion[i], src.batch.completion[i])
        assert got.completions[i] == src.completions[i]
        if swap:
            np.testing.assert_allclose(got.batch.old_logp[i], lp[i] * t.batch.completion_mask[i],
                                       rtol=1e-6)  # fmt: skip
            np.testing.assert_array_equal(got.batch.sampling_logp[i], got.batch.old_logp[i])
        else:
            np.testing.assert_array_equal(got.batch.old_logp[i], s.batch.old_logp[i])
    np.testing.assert_array_equal(got.batch.prompt_tokens, s.batch.prompt_tokens)
    t.problems = list(reversed(t.problems))
    with pytest.raises(ValueError, match="row by row"):
        ovd.replace_rows(s, t, rows, lp)


def _run(tmp_path, threshold=None):
    params = models.init(CONFIG, seed=0)
    args = (train.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=2),
            LoopConfig(steps=2, batch_size=2, workdir=str(tmp_path)),
            SamplingConfig(group_size=2, max_new_tokens=5))  # fmt: skip
    if threshold is None:
        return loops.run_grpo(CONFIG, params, _source(), *args)
    return ovd.run(CONFIG, params, CONFIG, models.init(CONFIG, seed=1), _source(), *args,
                   threshold=threshold)  # fmt: skip


def test_threshold_zero_is_grpo_and_ten_trains_on_the_teachers_samples(tmp_path):
    grpo = _run(tmp_path / "grpo")
    none = _run(tmp_path / "none", threshold=0)
    assert [h["ovd_replaced_frac"] for h in none.history] == [0.0, 0.0]
    np.testing.assert_allclose([h["loss"] for h in none.history],
                               [h["loss"] for h in grpo.history], rtol=1e-6)  # fmt: skip
    every = _run(tmp_path / "all", threshold=10)
    assert [h["ovd_replaced_frac"] for h in every.history] == [1.0, 1.0]
    teacher = rollouts.sample_step(CONFIG, models.init(CONFIG, seed=1), _source(),
                                   SamplingConfig(group_size=2, max_new_tokens=5),
                                   batch_size=2, seed=0, step=2)  # fmt: skip
    last = every.last_batch
    np.testing.assert_array_equal(last.completion, teacher.batch.completion)
    np.testing.assert_array_equal(last.old_logp, last.sampling_logp)
    assert jax.tree.structure(every.params) == jax.tree.structure(grpo.params)
    with pytest.raises(ValueError, match="threshold must lie"):
        _run(tmp_path / "bad", threshold=11)


def test_a_pretrained_teacher_is_asked_in_words_and_its_first_digit_is_the_score(monkeypatch):
    assert [ovd.parse_score(x) for x in (" 7", "score: 3/9", "x", "", "10")] == [7, 3, 0, 0, 1]
    teacher = models.init(CONFIG, seed=1)
    texts = {0: "Q: 1+2=", 1: "Q: 5-3="}
    scorer = ovd.verbal_scorer(CONFIG, teacher, TOK, texts.__getitem__)
    completions = [TOK.encode("3") + [TOK.eos_id], TOK.encode("9")]
    real = scorer([0, 1], completions)  # a random teacher: whatever digit it writes, or 0
    assert real.dtype == np.int32 and ((0 <= real) & (real <= 9)).all()
    asked = []

    def generate(config, params, prompts, **kw):  # the teacher replies "8x" and "no idea"
        asked.extend(TOK.decode(p[1:]) for p in prompts)
        assert kw["temperature"] == 0.0
        replies = [TOK.encode("8x"), TOK.encode("no idea")]
        tokens = np.zeros((2, 7), np.int32)
        for i, r in enumerate(replies):
            tokens[i, : len(r)] = r
        return SimpleNamespace(tokens=tokens, lengths=np.array([len(r) for r in replies]))

    monkeypatch.setattr(ovd.sampler, "generate", generate)
    np.testing.assert_array_equal(scorer([0, 1], completions), [8, 0])
    assert asked == ["Q: 1+2=3" + ovd.SCORE_REQUEST, "Q: 5-3=9" + ovd.SCORE_REQUEST]
