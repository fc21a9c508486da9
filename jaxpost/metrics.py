"""Metrics that tell SFT, RL and OPD apart: each a pure NumPy function with its formula.

Shapes: P problems (prompts), S samples per problem, B sequences, T completion positions,
V vocabulary, N items. Correctness arrays are boolean [P, S]; canonical solutions are given as
lists of per-problem lists of strings, with None for a sample that is not a valid solution.
Entropies, KLs and NLLs are in nats. Where an average has an undefined term (a problem with no
correct sample has no U/c), that term is NaN and means are taken over the defined terms only.

Uncertainty: `mean_ci` is a percentile bootstrap over problems with a seeded numpy Generator,
so a report is reproducible to the last digit.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------- pass@k


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k per problem (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge
    binomials, so it is exact to float precision for n in the thousands; it is 1 when n - c < k.
    Broadcasts over problems; requires 1 <= k <= n and 0 <= c <= n.
    """
    n, c = np.broadcast_arrays(np.asarray(num_samples, np.int64), np.asarray(num_correct, np.int64))
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("need 0 <= num_correct <= num_samples")
    if k < 1 or np.any(k > n):
        raise ValueError(f"need 1 <= k <= num_samples, got k={k}")
    out = np.ones(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if ni - ci >= k:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
    return out


def pass_hat_k(num_samples, num_correct, k: int) -> np.ndarray:
    """pass^k per problem (Yao et al. 2024): probability that k samples drawn without
    replacement are all correct, C(c, k) / C(n, k) = prod_{i=0}^{k-1} (c - i) / (n - i)."""
    n, c = np.broadcast_arrays(np.asarray(num_samples, np.int64), np.asarray(num_correct, np.int64))
    if np.any(c < 0) or np.any(c > n) or k < 1 or np.any(k > n):
        raise ValueError("need 0 <= num_correct <= num_samples and 1 <= k <= num_samples")
    i = np.arange(k, dtype=np.float64)
    return np.prod(np.clip(c[..., None] - i, 0, None) / (n[..., None] - i), axis=-1)


def cot_pass_at_k(answer_ok_PxS, chain_ok_PxS, k: int) -> np.ndarray:
    """CoT-pass@k per problem: pass@k where a sample counts only if its answer is right AND its
    chain verifies, c = sum_s answer_ok[p, s] * chain_ok[p, s]."""
    answer, chain = np.asarray(answer_ok_PxS, bool), np.asarray(chain_ok_PxS, bool)
    if answer.shape != chain.shape or answer.ndim != 2:
        raise ValueError(f"need two [P, S] arrays, got {answer.shape} and {chain.shape}")
    return pass_at_k(answer.shape[1], (answer & chain).sum(1), k)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean with a bootstrap confidence interval [lo, hi]."""

    mean: float
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def mean_ci(
    values, *, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Mean of the finite `values` with a percentile-bootstrap CI: resample problems with
    replacement `num_resamples` times and take the (1-confidence)/2 and (1+confidence)/2
    quantiles of the resampled means. NaN entries (undefined terms) are dropped first."""
    x = np.asarray(values, np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_resamples, x.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(float(x.mean()), float(lo), float(hi))


def pass_at_k_curve(correct_PxS, ks: Iterable[int], *, seed: int = 0) -> dict[str, list[float]]:
    """{"k", "mean", "lo", "hi"} of mean pass@k over problems for each k (the report's curve)."""
    correct = np.asarray(correct_PxS, bool)
    out: dict[str, list[float]] = {"k": [], "mean": [], "lo": [], "hi": []}
    for k in ks:
        est = mean_ci(pass_at_k(correct.shape[1], correct.sum(1), int(k)), seed=seed)
        out["k"].append(int(k))
        for name in ("mean", "lo", "hi"):
            out[name].append(getattr(est, name))
    return out


# ----------------------------------------------------------------------------- coverage


def coverage(num_correct) -> float:
    """Fraction of problems solved at least once: mean_p 1[c_p >= 1]."""
    return float(np.mean(np.asarray(num_correct) >= 1))


def support_change(base_num_correct, num_correct) -> dict[str, float]:
    """Problems solved (c >= 1) by one model and not the other, both sampled at the same n.

    gained = mean_p 1[c_base = 0 and c >= 1]; lost = mean_p 1[c_base >= 1 and c = 0].
    RL that sharpens without expanding the support shows lost > gained at large n.
    """
    base, new = np.asarray(base_num_correct) >= 1, np.asarray(num_correct) >= 1
    if base.shape != new.shape:
        raise ValueError(f"shapes differ: {base.shape} vs {new.shape}")
    return {"gained": float(np.mean(~base & new)), "lost": float(np.mean(base & ~new))}


def solution_set_coverage(
    found: Sequence[Iterable[Hashable | None]], solutions: Sequence[Iterable[Hashable]]
) -> np.ndarray:
    """Per problem, |distinct valid solutions found| / |all valid solutions| (NaN if none)."""
    out = []
    for got, every in zip(found, solutions, strict=True):
        every = set(every)
        hits = {s for s in got if s is not None} & every
        out.append(len(hits) / len(every) if every else np.nan)
    return np.asarray(out, np.float64)


# ----------------------------------------------------------------------------- diversity


def distinct_ratios(canonicals: Sequence[Hashable | None]) -> dict[str, float]:
    """For one problem's samples: U/n and U/c, U = distinct correct solutions, n = samples,
    c = correct samples (None marks an incorrect sample). U/c is NaN when c = 0."""
    correct = [s for s in canonicals if s is not None]
    u = len(set(correct))
    n = len(canonicals)
    return {"u_over_n": u / n if n else np.nan, "u_over_c": u / len(correct) if correct else np.nan}


def collision_rate(canonicals: Sequence[Hashable | None]) -> float:
    """Probability that two distinct correct samples are the same solution:
    sum_j m_j (m_j - 1) / (c (c - 1)), m_j = count of solution j among the c correct samples.
    NaN when c < 2. 1 is full collapse; 1/m for c -> inf spread uniformly over m solutions."""
    counts = np.asarray(list(Counter(s for s in canonicals if s is not None).values()), np.float64)
    c = counts.sum()
    return float((counts * (counts - 1)).sum() / (c * (c - 1))) if c >= 2 else float("nan")


def solution_entropy(canonicals: Sequence[Hashable | None]) -> float:
    """Entropy of the empirical distribution of correct solutions, -sum_j q_j log q_j with
    q_j = m_j / c (nats; log m for a uniform spread over m solutions). NaN when c = 0."""
    counts = np.asarray(list(Counter(s for s in canonicals if s is not None).values()), np.float64)
    if counts.sum() == 0:
        return float("nan")
    q = counts / counts.sum()
    return float(-(q * np.log(q)).sum())


def solution_counts(canonicals: Sequence[Hashable | None]) -> list[int]:
    """How many of the correct samples fell on each distinct solution, largest first: all that
    the entropy of a subsample of them depends on (`entropy_at_size`)."""
    return sorted(Counter(s for s in canonicals if s is not None).values(), reverse=True)


def entropy_at_size(counts: Sequence[int], n: int) -> float:
    """The expected `solution_entropy` of n of the c = sum(counts) correct samples drawn without
    replacement (nats): -sum_j sum_x P(X_j = x) (x/n) log(x/n), where X_j, how many of the n
    fall on solution j, is hypergeometric (c, m_j, n). At n = c it is the plug-in entropy.

    The plug-in entropy of c samples is biased low by about (solutions - 1) / 2c, so two models
    with the same spread of solutions read differently when one is correct more often; compared
    at one n (the smaller c of the two, per problem) the bias is the same on both sides
    (rarefaction, as ecology compares species diversity of unequal samples). NaN unless
    1 <= n <= c."""
    counts = [int(m) for m in counts if m > 0]
    c = sum(counts)
    if not 1 <= n <= c:
        return float("nan")
    total, ways = 0.0, math.comb(c, n)
    for m in counts:
        for x in range(max(1, n - (c - m)), min(m, n) + 1):
            p = math.comb(m, x) * math.comb(c - m, n - x) / ways
            total -= p * (x / n) * math.log(x / n)
    return total


def masked_mean(values_BxT, mask_BxT) -> float:
    """sum(values * mask) / sum(mask): a per-token average over real completion tokens, e.g.
    the mean per-token policy entropy from the sampler's entropies and completion mask."""
    v, m = np.asarray(values_BxT, np.float64), np.asarray(mask_BxT, np.float64)
    if v.shape != m.shape:
        raise ValueError(f"values {v.shape} and mask {m.shape} differ")
    return float((v * m).sum() / m.sum()) if m.sum() > 0 else float("nan")


# ----------------------------------------------------------------------------- retention


def accuracy_change(base_correct_P, correct_P, *, seed: int = 0) -> Estimate:
    """Paired change in accuracy on the same problems, mean_p (acc_p - acc_base_p), with a
    bootstrap CI over problems. Arrays may be [P] (0/1 or rates) or [P, S] (averaged over S)."""
    base, new = np.asarray(base_correct_P, np.float64), np.asarray(correct_P, np.float64)
    if base.shape != new.shape:
        raise ValueError(f"shapes differ: {base.shape} vs {new.shape}")
    if base.ndim == 2:
        base, new = base.mean(1), new.mean(1)
    return mean_ci(new - base, seed=seed)


def sequence_kl(base_logp_BxT, logp_BxT, mask_BxT, *, seed: int = 0) -> Estimate:
    """Monte-Carlo KL(pi_base || pi) from sequences y_b sampled from pi_base, never negative:

        KL ~= (1/B) sum_b sum_t mask[b, t] (r_bt - 1 - log r_bt),
        r_bt = pi(y_bt | y_b<t) / pi_base(y_bt | y_b<t).

    Each token's term is Schulman's "k3" estimator of that position's KL(pi_base || pi) given
    the prefix: unbiased (E[r] = 1 under pi_base) and >= 0 term by term; their sum over t is
    unbiased for the sequence KL by the chain rule. The plain estimator sum_t (log pi_base -
    log pi) is unbiased too but its sample mean is often negative for nearby policies (a
    model that assigns the base's own samples more mass than the base does), which reads as
    nonsense in a report. 0 for identical policies. CI by bootstrap over sequences."""
    base, logp, m = (np.asarray(a, np.float64) for a in (base_logp_BxT, logp_BxT, mask_BxT))
    if not base.shape == logp.shape == m.shape:
        raise ValueError(f"shapes differ: {base.shape}, {logp.shape}, {m.shape}")
    log_r = np.where(m > 0, logp - base, 0.0)
    return mean_ci(((np.expm1(log_r) - log_r) * m).sum(1), seed=seed)


# ----------------------------------------------------------------------------- steerability


def compliance_rate(compliant) -> float:
    """Fraction of samples that follow the instruction (and are valid): mean 1[compliant]."""
    return float(np.mean(np.asarray(compliant, bool)))


def empirical_distribution(
    labels: Iterable[Hashable | None], categories: Sequence[Hashable]
) -> np.ndarray:
    """Frequencies of `labels` over `categories` plus a last bin for everything else (invalid
    samples, None, or solutions outside the category list)."""
    index = {c: i for i, c in enumerate(categories)}
    counts = np.zeros(len(categories) + 1, np.float64)
    n = 0
    for label in labels:
        counts[index.get(label, len(categories))] += 1
        n += 1
    return counts / n if n else counts


def total_variation(p, q) -> float:
    """TV(p, q) = (1/2) sum_i |p_i - q_i|, in [0, 1]."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return float(0.5 * np.abs(p - q).sum())


def kl_divergence(p, q, *, smoothing: float = 0.0) -> float:
    """KL(p || q) = sum_i p_i log(p_i / q_i) over categories, with 0 log 0 = 0 and +inf where
    q_i = 0 < p_i. `smoothing` adds eps to every bin of both before renormalising (a finite
    estimate when a sample has not hit every category)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if smoothing:
        p, q = (p + smoothing) / (p + smoothing).sum(), (q + smoothing) / (q + smoothing).sum()
    on = p > 0
    if np.any(q[on] == 0):
        return float("inf")
    return float((p[on] * np.log(p[on] / q[on])).sum())


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence (nats, in [0, log 2]): the mean KL of p and q to m = (p+q)/2."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    m = (p + q) / 2
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def js_from_uniform(canonicals: Sequence[Hashable | None], solutions: Sequence[Hashable]) -> float:
    """JS divergence of one problem's samples (canonical solutions, None for invalid) from the
    uniform distribution over its full solution set, the invalid samples in an extra bin: 0 for a
    sampler of the whole set in equal shares, log 2 for one that is never valid (Spectrum
    Tuning's distributional fit, exact where the task enumerates its solutions)."""
    if not solutions:
        return float("nan")
    uniform = np.append(np.full(len(solutions), 1.0 / len(solutions)), 0.0)
    return js_divergence(empirical_distribution(canonicals, list(solutions)), uniform)


def steer_distance(
    produced: Iterable[Hashable | None],
    requested: Mapping[Hashable, float],
    *,
    smoothing: float = 1e-3,
) -> dict[str, float]:
    """Distance between the produced solution distribution and the requested one.

    `produced` are the samples' labels (a canonical solution, a first operation...; None for
    invalid), `requested` the target probabilities. Over the requested categories plus an
    "other" bin (requested mass 0): tv = TV(produced, requested), kl = KL(requested || produced)
    (how much of the request is missed; smoothed, since finite samples miss categories), and
    kl_reverse = KL(produced || requested) (mass outside the request; smoothed likewise).
    """
    categories = list(requested)
    want = np.append(np.asarray([requested[c] for c in categories], np.float64), 0.0)
    if not np.isclose(want.sum(), 1.0):
        raise ValueError(f"requested probabilities sum to {want.sum()}, not 1")
    got = empirical_distribution(produced, categories)
    return {
        "tv": total_variation(got, want),
        "kl": kl_divergence(want, got, smoothing=smoothing),
        "kl_reverse": kl_divergence(got, want, smoothing=smoothing),
    }


# ----------------------------------------------------------------------------- state locality


def state_locality(train_logp_BxT, train_mask_BxT, own_logp_BxT, own_mask_BxT) -> float:
    """Mean per-token NLL, under the final policy, of the states it was trained on minus that of
    its own samples: mean(-log pi on training data) - mean(-log pi on pi's samples). About 0 when
    training happened on the policy's own states (RL, OPD); large and positive for SFT on data
    the policy would not produce."""
    return masked_mean(-np.asarray(train_logp_BxT, np.float64), train_mask_BxT) - masked_mean(
        -np.asarray(own_logp_BxT, np.float64), own_mask_BxT
    )


def _contexts(sequence: Sequence[int], n: int) -> list[tuple]:
    seq = tuple(int(t) for t in sequence)
    return [seq[max(0, t - n) : t] for t in range(len(seq) + 1)]


def prefix_overlap(
    train_sequences: Iterable[Sequence[int]], own_sequences: Iterable[Sequence[int]], n: int = 4
) -> float:
    """Fraction of on-policy states whose n-gram context was visited in training.

    A state at position t of a completion is represented by its last n tokens,
    ctx_n(y, t) = y[max(0, t-n):t] (anchored at the start for t < n, so early states are exact
    prefixes). overlap = mean over states (y, t) of the policy's own samples, t = 0..|y|, of
    1[ctx_n(y, t) in {ctx_n(x, s) : x a training completion}]. 1 for identical sets.
    """
    seen = {ctx for x in train_sequences for ctx in _contexts(x, n)}
    hits = [ctx in seen for y in own_sequences for ctx in _contexts(y, n)]
    return float(np.mean(hits)) if hits else float("nan")


# ----------------------------------------------------------------------------- rank bias


def rank(x) -> np.ndarray:
    """Ranks 1..N of `x` (ascending), ties given their average rank."""
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        return x
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1  # id of each tie run
    positions = np.arange(1, x.size + 1, dtype=np.float64)
    ranks = np.empty(x.size, np.float64)
    ranks[order] = (np.bincount(run, positions) / np.bincount(run))[run]
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks. NaN if either side
    is constant or N < 2."""
    rx, ry = rank(x), rank(y)
    if rx.size != ry.size:
        raise ValueError(f"lengths differ: {rx.size} vs {ry.size}")
    if rx.size < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx**2).sum() * (ry**2).sum()))


def rank_bias(base_logp_N, logp_N, groups_N=None) -> float:
    """Rank bias (He, Fried & Welleck): Spearman correlation, over correct samples, between the
    base model's sequence log-probability and its change after training,
    rho(log pi_base(y), log pi(y) - log pi_base(y)). Positive: training lifted the samples the
    base already preferred (sharpening); negative: it lifted the unlikely ones. With `groups_N`
    (the problem of each sample), the correlation is computed within each problem and averaged
    over problems where it is defined."""
    base, new = np.asarray(base_logp_N, np.float64), np.asarray(logp_N, np.float64)
    if groups_N is None:
        return spearman(base, new - base)
    groups = np.asarray(groups_N)
    rhos = [spearman(base[groups == g], (new - base)[groups == g]) for g in np.unique(groups)]
    rhos = [r for r in rhos if np.isfinite(r)]
    return float(np.mean(rhos)) if rhos else float("nan")
