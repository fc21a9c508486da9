"""The head-to-head's claims and evaluation metrics on per-problem values and fixed samples:
no model, no training (tests/test_headtohead.py runs the protocol itself)."""

import numpy as np
import pytest

from jaxpost import headtohead, metrics
from jaxpost.headtohead import claims, evaluation


def test_claim_verdicts_follow_the_paired_interval():
    base = {"pass@1": [0.1] * 8, "pass@large_k": [0.9] * 8, "solution_counts": [[1, 1, 1]] * 8,
            "retention": [0.5] * 8}  # fmt: skip
    grpo = {"pass@1": [0.5] * 8, "pass@large_k": [0.6] * 8, "solution_counts": [[4]] * 8,
            "retention": [0.5] * 8}  # fmt: skip
    evals = {name: headtohead.Evaluation({}, {}, pp) for name, pp in
             (("base", base), ("grpo", grpo), ("opd_rkl", grpo))}  # fmt: skip
    by_claim = {c["claim"]: c["verdict"] for c in claims.claims(evals)}
    assert by_claim["RLVR (GRPO) beats the base at pass@1 but the base overtakes it at large k"] \
        == "reproduced"
    assert by_claim["reverse-KL OPD narrows diversity (solution entropy) below the base"] \
        == "reproduced"
    flipped = {name: headtohead.Evaluation({}, {}, pp) for name, pp in
               (("base", grpo), ("grpo", base))}  # fmt: skip
    (claim,) = claims.claims(flipped)
    assert claim["verdict"] == "not reproduced"  # GRPO is ahead at large k
    assert "base−GRPO -0.300" in claim["evidence"]


def _solutions(rng, problems: int, correct: int, samples: int = 0) -> list[list]:
    """Per problem, the solutions of `correct` samples drawn from one spread over four (the same
    for every model), then None (wrong samples) up to `samples`."""
    return [rng.choice(4, correct, p=[0.4, 0.3, 0.2, 0.1]).tolist()
            + [None] * max(0, samples - correct) for _ in range(problems)]  # fmt: skip


def test_diversity_claims_do_not_credit_the_model_that_is_right_more_often():
    """Two models with one spread of solutions per problem (drawn from the same distribution),
    one correct on 8 samples, the other on 3: their plug-in entropies differ by the
    small-sample bias alone, and the claims, which compare at equal numbers of correct samples,
    must not read that as narrowing."""
    rng = np.random.default_rng(0)
    problems = 300

    def counts(c):  # per problem, c correct samples over the four solutions
        return [metrics.solution_counts(row) for row in _solutions(rng, problems, c)]

    def plug_in(rows):  # each row's entropy over all its correct samples
        return [metrics.entropy_at_size(r, sum(r)) for r in rows]

    often, rarely = counts(8), counts(3)
    biased = claims.paired(plug_in(often), plug_in(rarely))
    assert biased.lo > 0.1  # what comparing the plug-in entropies would have concluded
    gap, k = claims.entropy_gap(rarely, often)
    assert k == problems and gap.lo < 0 < gap.hi
    pp = {"pass@1": [0.5] * problems, "pass@large_k": [0.5] * problems}
    evals = {"base": headtohead.Evaluation({}, {}, {**pp, "solution_counts": often}),
             "opd_rkl": headtohead.Evaluation({}, {}, {**pp, "solution_counts": rarely})}
    (claim,) = claims.claims(evals)
    assert claim["verdict"] == "inconclusive", claim
    assert f"({problems} problems)" in claim["evidence"]


def test_the_diversity_scalar_does_not_credit_the_model_that_is_right_more_often():
    """The report's per-problem `diversity` (1 - collision rate of the correct samples'
    solutions) on two models with one spread, correct on 12 of 16 samples and on 3: equal in
    expectation, where the plug-in `solution_entropy` reads the second as narrower."""
    row = ["a", "a", "b", None]
    d = evaluation.solution_diversity([row, ["a", None], [None, None]])
    assert d["diversity"][0] == pytest.approx(1 - 2 / 6)
    assert d["solution_entropy"][0] == pytest.approx(-(2 / 3 * np.log(2 / 3) + np.log(1 / 3) / 3))
    assert d["solution_counts"] == [[2, 1], [1], []]
    assert np.isnan(d["diversity"][1:]).all() and d["solution_entropy"][1] == 0.0
    rng = np.random.default_rng(0)
    often = evaluation.solution_diversity(_solutions(rng, 400, 12, samples=16))
    rarely = evaluation.solution_diversity(_solutions(rng, 400, 3, samples=16))
    plug_in = claims.paired(often["solution_entropy"], rarely["solution_entropy"])
    assert plug_in.lo > 0.1
    gap = claims.paired(often["diversity"], rarely["diversity"])
    assert gap.lo < 0 < gap.hi and abs(gap.mean) < 0.03


def _copies_samples():
    """Two problems x four samples: problem 0 holds one completion three times and one other,
    problem 1 three distinct correct completions and a wrong one."""
    from jaxpost import evaluate

    P, S, M = 2, 4, 3
    tokens = np.array([[5, 6, 0], [5, 6, 0], [5, 6, 0], [7, 8, 9],
                       [1, 2, 0], [1, 3, 0], [1, 4, 0], [9, 9, 9]])  # fmt: skip
    ok = np.array([[True, True, True, True], [True, True, True, False]])
    seq = np.array([[-1.0, -1.0 + 1e-7, -1.0 - 1e-7, -2.0], [-0.5, -1.5, -2.5, -9.0]])
    return evaluate.Samples(
        problems=[0, 1], prompts=[[3], [4]], texts=[[""] * S] * P, tokens=tokens,
        mask=(tokens > 0).astype(np.int32), logprobs=np.zeros((P * S, M)), seq_logprob=seq,
        answer_ok=ok, chain_ok=ok, canonical=[[None] * S] * P, diversity_keys=[[None] * S] * P)  # fmt: skip


def _fake_forced(scored: list):
    def fake(model, params, prompts, toks, m, **_):  # row-dependent last bits, as batching gives
        scored.append(toks.copy())
        jitter = np.arange(len(toks))[:, None] * 1e-9
        return -toks.astype(float) / 10 * m + jitter * m

    return fake


def test_rank_bias_scores_each_distinct_correct_completion_once(monkeypatch):
    """Copies of a correct completion share one base score, however the rows were batched."""
    samples, scored = _copies_samples(), []
    monkeypatch.setattr(evaluation, "forced_logprobs", _fake_forced(scored))
    got = evaluation.rank_bias(type("Base", (), {"params": None})(), samples)
    assert len(scored) == 1 and len(scored[0]) == 5  # 7 correct rows, 5 distinct completions
    base0 = np.array([-1.1, -1.1, -1.1, -2.4])  # copies share the first copy's score...
    new0 = np.array([-1.0, -1.0, -1.0, -2.0])  # ...and the first copy's own logprob
    base1, new1 = np.array([-0.3, -0.4, -0.5]), samples.seq_logprob[1, :3]
    want = metrics.rank_bias(np.r_[base0, base1], np.r_[new0, new1], [0, 0, 0, 0, 1, 1, 1])
    assert np.isclose(got, want, atol=1e-6)


def test_sample_logprobs_teacher_force_each_distinct_sample_once(monkeypatch):
    samples, scored = _copies_samples(), []
    monkeypatch.setattr(evaluation, "forced_logprobs", _fake_forced(scored))
    lp = evaluation.sample_logprobs(None, None, samples)
    assert len(scored) == 1 and len(scored[0]) == 6  # 8 rows, 6 distinct (problem, completion)
    assert lp.shape == samples.tokens.shape
    np.testing.assert_array_equal(lp[0], lp[1])  # copies: the first copy's values exactly
    np.testing.assert_array_equal(lp[0], lp[2])
    want = -samples.tokens / 10 * samples.mask
    np.testing.assert_allclose(lp, want, atol=1e-8)  # each row its own completion's values
