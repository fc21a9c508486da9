"""Every metric on synthetic cases whose answer is known."""

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.stats

from jaxpost import metrics as M

# ----------------------------------------------------------------------------- pass@k


def _exact_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_exact_on_small_cases():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = M.pass_at_k(n, c, k)
                assert got == pytest.approx(float(_exact_pass_at_k(n, c, k)), abs=1e-12)
                hat = M.pass_hat_k(n, c, k)
                assert hat == pytest.approx(math.comb(c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_properties():
    n = np.array([10, 10, 10, 7])
    c = np.array([0, 3, 10, 5])
    np.testing.assert_allclose(M.pass_at_k(n, c, 1), c / n)
    assert M.pass_at_k(10, 8, 3) == 1.0  # n - c < k
    curve = np.stack([M.pass_at_k(n, c, k) for k in range(1, 8)])
    assert np.all(np.diff(curve, axis=0) >= -1e-15)  # monotone in k
    assert M.pass_at_k(n, c, 4).shape == (4,)


def test_pass_at_k_stable_at_1024():
    n = 1024
    for c in (1, 7, 100, 512, 1000):
        for k in (1, 16, 256, 1024):
            got = float(M.pass_at_k(n, c, k))
            assert got == pytest.approx(float(_exact_pass_at_k(n, c, k)), rel=1e-10, abs=1e-14)
    assert np.isfinite(M.pass_at_k(n, np.arange(n + 1), 512)).all()


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError):
        M.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        M.pass_at_k(4, 2, 5)
    with pytest.raises(ValueError):
        M.pass_at_k(4, 2, 0)


def test_cot_pass_at_k_counts_only_verified_chains():
    answer = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    chain = np.array([[1, 0, 0, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(M.cot_pass_at_k(answer, chain, 1), [0.25, 0.0])
    np.testing.assert_allclose(M.cot_pass_at_k(answer, answer, 2), M.pass_at_k(4, [3, 1], 2))


def test_mean_ci_is_seeded_and_covers_the_mean():
    x = np.random.default_rng(0).random(200)
    est = M.mean_ci(x, seed=1)
    assert est == M.mean_ci(x, seed=1)
    assert est.lo < est.mean < est.hi and est.mean == pytest.approx(x.mean())
    assert est.hi - est.lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(200), rel=0.15)
    assert M.mean_ci([0.5, 0.5, np.nan]).as_dict() == {"mean": 0.5, "lo": 0.5, "hi": 0.5}
    assert math.isnan(M.mean_ci([np.nan]).mean)
    curve = M.pass_at_k_curve(np.eye(4, 8, dtype=bool), [1, 2, 8])
    assert curve["k"] == [1, 2, 8] and curve["mean"][0] == pytest.approx(1 / 8)
    assert curve["mean"][-1] == 1.0


# ----------------------------------------------------------------------------- coverage


def test_coverage_and_support_change():
    assert M.coverage([0, 1, 5, 0]) == 0.5
    assert M.support_change([0, 0, 3, 2], [1, 0, 0, 4]) == {"gained": 0.25, "lost": 0.25}
    cov = M.solution_set_coverage([["a", "a", None, "x"], [None], []], [["a", "b"], ["c"], []])
    np.testing.assert_allclose(cov, [0.5, 0.0, np.nan])


# ----------------------------------------------------------------------------- diversity


def test_diversity_on_known_distributions():
    m = 5
    uniform = [f"s{j}" for j in range(m)] * 4  # 20 correct samples, uniform over m
    assert M.solution_entropy(uniform) == pytest.approx(math.log(m))
    assert M.solution_entropy(["a"] * 7 + [None]) == 0.0
    assert M.distinct_ratios(uniform + [None] * 5) == {"u_over_n": 0.2, "u_over_c": 0.25}
    assert math.isnan(M.distinct_ratios([None, None])["u_over_c"])
    assert M.collision_rate(["a"] * 4) == 1.0
    assert M.collision_rate(["a", "b", "c", None]) == 0.0
    assert M.collision_rate(uniform) == pytest.approx(5 * 4 * 3 / (20 * 19))
    assert math.isnan(M.collision_rate(["a", None]))


@pytest.mark.parametrize("samples", [["a", "a", "b", None, "c", "a", "b"], ["a"] * 5, list("abcdef"),
                                     ["a", "b"] * 3 + ["c"] + [None] * 2])  # fmt: skip
def test_entropy_at_size_is_the_mean_over_every_subsample(samples):
    """Against enumeration: the plug-in entropy of every n-subset of the correct samples,
    averaged; at n = c, the plug-in entropy itself."""
    import itertools

    correct = [s for s in samples if s is not None]
    counts = M.solution_counts(samples)
    assert counts == sorted(counts, reverse=True) and sum(counts) == len(correct)
    for n in range(1, len(correct) + 1):
        subsets = list(itertools.combinations(correct, n))
        want = np.mean([M.solution_entropy(list(s)) for s in subsets])
        assert M.entropy_at_size(counts, n) == pytest.approx(want, abs=1e-12), n
    assert M.entropy_at_size(counts, len(correct)) == pytest.approx(M.solution_entropy(samples))
    assert math.isnan(M.entropy_at_size(counts, 0))
    assert math.isnan(M.entropy_at_size(counts, len(correct) + 1))


def test_masked_mean():
    values = np.array([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    assert M.masked_mean(values, np.array([[1, 1, 0], [1, 0, 0]])) == pytest.approx(7 / 3)
    assert math.isnan(M.masked_mean(values, np.zeros((2, 3))))
    with pytest.raises(ValueError, match="differ"):
        M.masked_mean(values, np.ones((2, 2)))


# ----------------------------------------------------------------------------- retention


def test_retention():
    base = np.array([[1, 0], [1, 1], [0, 0]])
    new = np.array([[1, 1], [0, 1], [0, 0]])
    assert M.accuracy_change(base, new).mean == pytest.approx(0.0)
    assert M.accuracy_change([0, 0, 1], [1, 1, 1]).mean == pytest.approx(2 / 3)
    rng = np.random.default_rng(0)
    logp = -rng.random((8, 5))
    mask = (rng.random((8, 5)) < 0.7).astype(np.int32)
    same = M.sequence_kl(logp, logp, mask)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)


def test_sequence_kl_matches_exact_kl():
    """Sequences of length 1 from p; the MC estimate converges to sum p log(p/q)."""
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])
    y = np.random.default_rng(0).choice(3, size=4000, p=p)
    est = M.sequence_kl(np.log(p[y])[:, None], np.log(q[y])[:, None], np.ones((y.size, 1)))
    exact = float((p * np.log(p / q)).sum())
    assert est.lo < exact < est.hi and est.mean == pytest.approx(exact, abs=0.05)


def test_sequence_kl_is_never_negative():
    """A model that gives the base's own samples more mass than the base (so the plain log-ratio
    estimate is negative) still gets a KL estimate >= 0 for every sequence."""
    rng = np.random.default_rng(1)
    base = np.log(rng.uniform(0.05, 0.5, (16, 6)))
    logp = np.minimum(base + 0.3, 0.0)  # more mass on every sampled token
    mask = np.ones_like(base)
    assert ((base - logp) * mask).sum(1).mean() < 0
    est = M.sequence_kl(base, logp, mask)
    assert est.lo >= 0 and est.mean > 0


# ----------------------------------------------------------------------------- steerability


def test_steerability():
    assert M.compliance_rate([True, False, True, True]) == 0.75
    requested = {"a": 0.5, "b": 0.5}
    perfect = M.steer_distance(["a", "b"] * 10, requested, smoothing=0.0)
    assert perfect == {"tv": 0.0, "kl": 0.0, "kl_reverse": 0.0}
    off = M.steer_distance(["a"] * 4 + [None] * 4, requested, smoothing=0.0)
    assert off["tv"] == pytest.approx(0.5)  # |.5-.5| + |0-.5| + |.5-0|, halved
    assert off["kl"] == math.inf and off["kl_reverse"] == math.inf
    smoothed = M.steer_distance(["a"] * 4 + [None] * 4, requested)
    assert 0 < smoothed["kl"] < math.inf
    with pytest.raises(ValueError):
        M.steer_distance(["a"], {"a": 0.4})
    assert M.kl_divergence([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]) == pytest.approx(math.log(2))
    assert M.total_variation([1, 0], [0, 1]) == 1.0


# ----------------------------------------------------------------------------- state locality


def test_state_locality():
    rng = np.random.default_rng(0)
    logp = -rng.random((4, 6))
    mask = np.ones((4, 6), np.int32)
    assert M.state_locality(logp, mask, logp, mask) == 0.0
    assert M.state_locality(logp - 1.0, mask, logp, mask) == pytest.approx(1.0)
    seqs = [[1, 2, 3, 4], [1, 2, 5]]
    assert M.prefix_overlap(seqs, seqs, n=2) == 1.0
    # Own states of [9, 2, 3]: (), (9,), (9, 2), (2, 3); () and (2, 3) were seen in training.
    assert M.prefix_overlap(seqs, [[9, 2, 3]], n=2) == 0.5
    assert M.prefix_overlap(seqs, [[9, 9, 9]], n=2) == 0.25
    assert M.prefix_overlap(seqs, [[1, 2, 3]], n=2) == 1.0


# ----------------------------------------------------------------------------- rank bias


def test_rank_and_spearman_against_scipy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=30).astype(float)  # many ties
    y = x + rng.normal(size=30)
    np.testing.assert_allclose(M.rank(x), scipy.stats.rankdata(x))
    assert M.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    assert math.isnan(M.spearman([1, 1, 1], [1, 2, 3]))


def test_rank_bias_signs():
    base = np.log(np.array([0.5, 0.2, 0.1, 0.05]))
    # Halving every logprob lifts unlikely samples most (change -base/2 grows as base falls).
    assert M.rank_bias(base, base * 0.5) == -1.0
    # Doubling lowers unlikely samples most: the likely ones gain relative to them.
    assert M.rank_bias(base, base * 2.0) == 1.0
    groups = np.array([0, 0, 1, 1])
    assert M.rank_bias(base, base * 2.0, groups) == 1.0
    assert math.isnan(M.rank_bias(base[:1], base[:1], groups[:1]))
