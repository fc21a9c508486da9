"""The literature's claims the head-to-head can test, judged by paired 95% CIs over problems.

Each claim pairs two models' per-problem values (`Evaluation.per_problem`) and bootstraps the
mean difference: "reproduced" when the interval excludes 0 in the predicted direction, "not
reproduced" when it excludes 0 in the other, otherwise "inconclusive". Diversity is compared
at equal numbers of correct samples per problem (`entropy_gap`). A claim is only judged when
the arms it needs ran.
"""

from __future__ import annotations

import numpy as np

from jaxpost import metrics
from jaxpost.headtohead.arms import ARMS


def paired(a, b) -> metrics.Estimate:
    """Mean of a - b over problems where both are defined, with a bootstrap CI."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return metrics.mean_ci(a[ok] - b[ok])


def entropy_gap(a, b) -> tuple[metrics.Estimate, int]:
    """Solution entropy of a minus b, compared per problem at the same number of correct
    samples, n = the smaller of the two counts (`metrics.entropy_at_size` of each model's
    `solution_counts`), over the problems where n >= 2 (at n = 1 both read 0); with how many
    problems that is. The plug-in entropies would credit the model that is more often correct
    with more diversity (`entropy_at_size`)."""
    gaps = []
    for ca, cb in zip(a, b, strict=True):
        n = min(sum(ca), sum(cb))
        if n >= 2:
            gaps.append(metrics.entropy_at_size(ca, n) - metrics.entropy_at_size(cb, n))
    return metrics.mean_ci(np.asarray(gaps, float)), len(gaps)


def _verdict(est: metrics.Estimate, expect_positive: bool = True) -> str:
    lo, hi = (est.lo, est.hi) if expect_positive else (-est.hi, -est.lo)
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced"
    return "inconclusive"


def _e(est: metrics.Estimate) -> str:
    return f"{est.mean:+.3f} [{est.lo:+.3f}, {est.hi:+.3f}]"


def _at_equal_size(est: metrics.Estimate, problems: int) -> str:
    return f"{_e(est)} nats at equal numbers of correct samples ({problems} problems)"


def claims(evals: dict) -> list[dict]:
    """The literature's claims this setup can test, judged by paired 95% CIs over problems.

    "reproduced": the CI of the predicted difference excludes 0 in the predicted direction;
    "not reproduced": it excludes 0 in the other direction; otherwise "inconclusive".
    """
    out = []
    pp = {k: v.per_problem for k, v in evals.items()}
    if "grpo" in pp:
        gain1 = paired(pp["grpo"]["pass@1"], pp["base"]["pass@1"])
        over = paired(pp["base"]["pass@large_k"], pp["grpo"]["pass@large_k"])
        verdict = _verdict(over)
        if verdict == "reproduced" and gain1.lo <= 0:
            verdict = "inconclusive"  # a crossover needs GRPO ahead at k=1 first
        out.append({
            "claim": "RLVR (GRPO) beats the base at pass@1 but the base overtakes it at large k",
            "source": "Yue et al. 2025", "verdict": verdict,
            "evidence": f"pass@1 GRPO−base {_e(gain1)}; pass@large_k base−GRPO {_e(over)}",
        })  # fmt: skip
    if "grpo" in pp and "grpo_unlikely" in pp:
        d = paired(pp["grpo_unlikely"]["pass@large_k"], pp["grpo"]["pass@large_k"])
        out.append({"claim": "the unlikeliness reward raises pass@large_k over GRPO",
                    "source": "He, Fried & Welleck 2025", "verdict": _verdict(d),
                    "evidence": f"pass@large_k unlikely−GRPO {_e(d)}"})  # fmt: skip
    on_policy = [a for a in pp if a in ARMS and ARMS[a].on_policy]  # the table says which
    if "sft" in pp and on_policy:
        ret = np.mean([pp[a]["retention"] for a in on_policy], axis=0)
        d = paired(ret, pp["sft"]["retention"])
        gains = ", ".join(
            f"{a} {_e(paired(pp[a]['pass@1'], pp['base']['pass@1']))}" for a in ["sft", *on_policy]
        )
        out.append({"claim": "on-policy methods retain more of the earlier skill than SFT",
                    "source": "Shenfeld et al. 2025; Chen et al. 2025 (RL's razor / retention)",
                    "verdict": _verdict(d),
                    "evidence": f"addition accuracy, mean of {'/'.join(on_policy)} − SFT "
                                f"{_e(d)}; pass@1 gains: {gains}"})  # fmt: skip
    for arm, label in (("opd_rkl", "reverse-KL OPD"), ("opsd", "OPSD")):
        if arm in pp:
            d, k = entropy_gap(pp[arm]["solution_counts"], pp["base"]["solution_counts"])
            out.append({"claim": f"{label} narrows diversity (solution entropy) below the base",
                        "source": "Agarwal et al. 2024 (GKD); mode-seeking reverse KL",
                        "verdict": _verdict(d, expect_positive=False),
                        "evidence": f"entropy {arm}−base {_at_equal_size(d, k)}"})  # fmt: skip
    fp_arms = [a for a in ("grpo", "sft") if "footprint_flip_frac" in pp.get(a, {})]
    if fp_arms == ["grpo", "sft"]:
        d = paired(pp["sft"]["footprint_flip_frac"], pp["grpo"]["footprint_flip_frac"])
        out.append({"claim": "RL changes the base's argmax at fewer positions than SFT",
                    "source": "Sparse policy selection (2605.06241)", "verdict": _verdict(d),
                    "evidence": f"share of the base's sample positions whose argmax changed, "
                                f"SFT−GRPO {_e(d)}"})  # fmt: skip
    if "grpo" in fp_arms:
        d = metrics.mean_ci(np.asarray(pp["grpo"]["footprint_entropy_excess"], float))
        evidence = (f"GRPO: base entropy at changed positions − at all {_e(d)} nats"
                    if np.isfinite(d.mean) else "GRPO changed no argmax on the base's samples")  # fmt: skip
        out.append({"claim": "where RL changes the argmax, the base was uncertain (base entropy "
                             "above its average)", "source": "Sparse policy selection "
                    "(2605.06241)", "verdict": _verdict(d), "evidence": evidence})  # fmt: skip
    if "alpha_dpg" in pp and "grpo" in pp:
        d = paired(pp["alpha_dpg"]["pass@large_k"], pp["grpo"]["pass@large_k"])
        d1 = paired(pp["alpha_dpg"]["pass@1"], pp["grpo"]["pass@1"])
        out.append({"claim": "alpha-DPG at a small alpha keeps pass@large_k above GRPO's",
                    "source": "Whatever Remains Must Be True (2512.05962)", "verdict": _verdict(d),
                    "evidence": f"pass@large_k alpha_dpg−GRPO {_e(d)}; pass@1 {_e(d1)}"})  # fmt: skip
    if "spectrum" in pp and "sft" in pp:
        d = paired(pp["spectrum"]["yield"], pp["sft"]["yield"])
        js = paired(pp["spectrum"]["js_from_uniform"], pp["sft"]["js_from_uniform"])
        ret = paired(pp["spectrum"]["retention"], pp["sft"]["retention"])
        out.append({"claim": "Spectrum Tuning raises yield (distinct valid outputs per sample) "
                             "over plain SFT", "source": "Spectrum Tuning (2510.06084)",
                    "verdict": _verdict(d),
                    "evidence": f"yield spectrum−SFT {_e(d)}; JS from uniform {_e(js)}; "
                                f"retention {_e(ret)}"})  # fmt: skip
    if "sft_mild" in pp and "sft_stress" in pp:
        d = paired(pp["sft_mild"]["retention"], pp["sft_stress"]["retention"])
        out.append({"claim": "a larger SFT step (further off the policy's own states) keeps "
                             "less of the earlier skill", "source": "The state-distribution view "
                    "(2605.22731)", "verdict": _verdict(d),
                    "evidence": f"addition accuracy sft_mild−sft_stress {_e(d)} (their state "
                                f"locality: the metrics table)"})  # fmt: skip
    if "opd_degraded" in pp and "teacher_degraded" in pp:
        d = paired(pp["opd_degraded"]["pass@1"], pp["teacher_degraded"]["pass@1"])
        out.append({"claim": "OPD from a degraded teacher beats that teacher", "source":
                    "The state-distribution view (2605.22731)", "verdict": _verdict(d),
                    "evidence": f"pass@1 opd_degraded−teacher_degraded {_e(d)}"})  # fmt: skip
    if "ovd" in pp and "grpo" in pp:
        d = paired(pp["ovd"]["pass@1"], pp["grpo"]["pass@1"])
        out.append({"claim": "OVD (teacher-scored rollouts, rejected ones replaced by teacher "
                             "demonstrations) beats GRPO at pass@1", "source": "On-policy "
                    "verbal distillation (2601.21968)", "verdict": _verdict(d),
                    "evidence": f"pass@1 ovd−GRPO {_e(d)}"})  # fmt: skip
    if "gad" in pp and "sft" in pp:
        d = paired(pp["gad"]["pass@1"], pp["sft"]["pass@1"])
        b = paired(pp["gad"]["pass@1"], pp["base"]["pass@1"])
        out.append({"claim": "black-box on-policy distillation (GAD, teacher samples only) beats "
                             "SFT at pass@1", "source": "GAD (2511.10643; there against SFT on "
                    "teacher responses, here on dataset solutions)", "verdict": _verdict(d),
                    "evidence": f"pass@1 gad−SFT {_e(d)}; gad−base {_e(b)}"})  # fmt: skip
    if "qsharp" in pp:
        d = paired(pp["qsharp"]["pass@1"], pp["base"]["pass@1"])
        ret = paired(pp["qsharp"]["retention"], pp["base"]["retention"])
        out.append({"claim": "value-guided decoding of the frozen base (Q♯) raises pass@1 over the "
                             "base", "source": "Q♯ (Zhou et al., NeurIPS 2025)",
                    "verdict": _verdict(d),
                    "evidence": f"pass@1 qsharp−base {_e(d)}; retention qsharp−base {_e(ret)} "
                                f"(the base's by construction: the weights are untouched)"})  # fmt: skip
    if "sparse_select" in pp:
        d = paired(pp["sparse_select"]["pass@1"], pp["base"]["pass@1"])
        out.append({"claim": "training only the base's high-entropy decision points of its own "
                             "rollouts raises pass@1 over the base", "source": "Sparse policy "
                    "selection (2605.06241)", "verdict": _verdict(d),
                    "evidence": f"pass@1 sparse_select−base {_e(d)}"})  # fmt: skip
    if "opd_entropy" in pp and "opd_rkl" in pp:
        d, k = entropy_gap(pp["opd_entropy"]["solution_counts"], pp["opd_rkl"]["solution_counts"])
        out.append({"claim": "entropy-aware OPD keeps more diversity than reverse-KL OPD",
                    "source": "Jin et al. 2026", "verdict": _verdict(d),
                    "evidence": f"entropy entropy-aware−reverse-KL {_at_equal_size(d, k)}"})  # fmt: skip
    return out
