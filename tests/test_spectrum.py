"""Spectrum Tuning's data (jaxpost.spectrum) and its metrics: yield, JS from uniform over the
full solution set (against a float64 formula), in-context steering prompts."""

import math

import numpy as np
import pytest

from jaxpost import metrics, spectrum
from jaxpost.tasks.countdown import Countdown
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
TASK = Countdown(number_range=(1, 9), target_range=(10, 40), min_solutions=3)


def _outputs(completion: list[int]) -> list[str]:
    """The texts between eos tokens (each output is closed by one)."""
    assert completion[-1] == TOK.eos_id
    cut = [i for i, t in enumerate(completion) if t == TOK.eos_id]
    starts = [0] + [i + 1 for i in cut[:-1]]
    return [TOK.decode(completion[a:b]) for a, b in zip(starts, cut)]


def test_sequences_hold_independent_uniform_draws_closed_by_eos():
    problems = TASK.prompts("train", 6, seed=0)
    examples = spectrum.spectrum_examples(TOK, TASK, problems, outputs=3, per_problem=2, seed=1)
    assert len(examples) == 12
    for k, (prompt, completion) in enumerate(examples):
        p = problems[k // 2]
        assert prompt == TOK.encode(TASK.render_prompt(p), add_bos=True)
        outs = _outputs(completion)
        assert len(outs) == 3 and all(TASK.verify_chain(p, o) for o in outs)
    p = problems[0]  # many sequences of one problem: each slot uniform over the solution set
    many = spectrum.spectrum_examples(TOK, TASK, [p], outputs=2, per_problem=3000, seed=2)
    sols = TASK.solutions(p)
    for slot in (0, 1):
        got = [TASK.canonical(p, _outputs(c)[slot]) for _, c in many]
        freq = np.asarray([got.count(s) for s in sols]) / len(got)
        np.testing.assert_allclose(freq, 1 / len(sols), atol=0.05)
    again = spectrum.spectrum_examples(TOK, TASK, problems, outputs=3, per_problem=2, seed=1)
    assert again == examples
    with pytest.raises(ValueError, match="outputs and per_problem"):
        spectrum.spectrum_examples(TOK, TASK, problems, outputs=0, per_problem=1, seed=0)


def test_in_context_prompts_show_compliant_outputs():
    steer = TASK.steering()
    problems = steer.prompts("test", 5, seed=0)
    contexts = spectrum.steer_contexts(steer, problems, examples=3, seed=2)
    for p, outs in zip(problems, contexts):
        assert len(outs) == 3 and all(steer.complies(p, o) for o in outs)
        ids = spectrum.in_context_prompt(TOK, TASK.render_prompt(p.base), outs)
        assert ids[0] == TOK.bos_id and ids.count(TOK.eos_id) == 3 and ids[-1] == TOK.eos_id
        assert TOK.decode(ids, stop_at_eos=False) == TASK.render_prompt(p.base) + "".join(outs)


def test_js_from_uniform_matches_the_formula():
    sols = ["a", "b", "c", "d"]
    assert metrics.js_from_uniform(["a", "b", "c", "d"] * 3, sols) == pytest.approx(0.0, abs=1e-12)
    assert metrics.js_from_uniform([None] * 5, sols) == pytest.approx(math.log(2))
    samples = ["a", "a", "a", "b", None, "x"]  # "x" is no solution: it counts as invalid
    p = np.array([3, 1, 0, 0, 2]) / 6
    q = np.array([0.25] * 4 + [0.0])
    m = (p + q) / 2

    def kl(x, y):
        return sum(a * math.log(a / b) for a, b in zip(x, y) if a > 0)

    want = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    assert metrics.js_from_uniform(samples, sols) == pytest.approx(want, rel=1e-12)
    assert math.isnan(metrics.js_from_uniform(["a"], []))
    assert metrics.distinct_ratios(samples)["u_over_n"] == pytest.approx(3 / 6)  # the yield
