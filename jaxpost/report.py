"""The head-to-head report: plots and report.md from the metrics of each arm.

Input is plain data, so a report can be re-rendered from a saved metrics.json:

    metrics = {
      "arms": {
        "base": {
          "curves": {"pass@k": {"k": [...], "mean": [...], "lo": [...], "hi": [...]},
                     "cot_pass@k": {...}},
          "scalars": {"pass@1": {"mean": m, "lo": l, "hi": h}, ...},
          "history": [{"step": 1, "loss": ...}, ...],      # training curve (arms only)
          "sparse_footprint": {"flip_frac": ..., ...},   # `jaxpost.footprint` (not the base)
          "kind": "reference" | "arm",
          "diverged": "why",              # only for an arm that diverged (no curves, scalars)
        }, ...
      },
      "smoke_test": bool,                 # the tiny variant: report.md says the numbers mean nothing
      "radar_axes": ["pass@1", "pass@large_k", "diversity", "retention", "steerability",
                     "efficiency"],
      "claims": [{"claim": ..., "source": ..., "verdict": "reproduced" | "not reproduced" |
                  "inconclusive", "evidence": ...}, ...],
      "settings": {...},
    }

Every number in the report is read from that dictionary; nothing is typed in here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import numpy as np

_STYLE = {"base": ("black", "--"), "teacher": ("dimgray", ":"), "teacher_degraded": ("silver", ":")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color_map(names: Sequence[str]) -> dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colors, i = {}, 0
    for name in names:
        if name in _STYLE:
            colors[name] = _STYLE[name][0]
        else:
            colors[name] = cmap(i % cmap.N)
            i += 1
    return colors


def plot_curves(arms: dict, curve: str, path: str, title: str) -> None:
    """A pass@k-style curve per arm on a log-k axis, with its 95% CI band."""
    plt = _plt()
    names = [n for n in arms if curve in arms[n].get("curves", {})
             and np.isfinite(np.asarray(arms[n]["curves"][curve]["mean"], float)).any()]  # fmt: skip
    colors = _color_map(names)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if not names:
        _empty(ax, f"no arm has a finite {curve} curve")
    for name in names:
        c = arms[name]["curves"][curve]
        k = np.asarray(c["k"], float)
        style = _STYLE.get(name, (None, "-"))[1]
        ax.plot(k, c["mean"], style, color=colors[name], label=name, lw=1.8)
        if "lo" in c and "hi" in c:
            ax.fill_between(k, c["lo"], c["hi"], color=colors[name], alpha=0.12, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem, log scale)")
    ax.set_ylabel(curve)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if names:
        ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def informative_axes(arms: dict, axes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(axes whose finite values differ across the arms, the others): an axis that is NaN or
    constant for every arm would put every profile at one radius and say nothing."""
    keep, drop = [], []
    for a in axes:
        col = np.asarray([arm["scalars"].get(a, {}).get("mean", math.nan) for arm in arms.values()],
                         float)  # fmt: skip
        finite = col[np.isfinite(col)]
        (keep if finite.size >= 2 and np.ptp(finite) > 1e-12 else drop).append(a)
    return keep, drop


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def radar_values(arms: dict, axes: Sequence[str]) -> dict[str, list[float]]:
    """Each axis min-max normalised across the arms shown (so 1 = best arm on that axis)."""
    raw = {n: [arms[n]["scalars"].get(a, {}).get("mean", math.nan) for a in axes] for n in arms}
    out = {n: [] for n in arms}
    for j in range(len(axes)):
        col = np.asarray([raw[n][j] for n in arms], float)
        finite = col[np.isfinite(col)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        for n, v in zip(arms, col):
            out[n].append(0.5 if hi - lo < 1e-12 or math.isnan(v) else float((v - lo) / (hi - lo)))
    return out


def plot_radar(arms: dict, axes: Sequence[str], path: str) -> None:
    """Six-axis radar: each arm's profile, axes normalised across the base and the arms (outer
    ring = best). The teacher is left out: it had a different budget and would set every scale."""
    plt = _plt()
    arms = {n: a for n, a in arms.items() if n != "teacher" and not a.get("diverged")}
    axes, flat = informative_axes(arms, axes)
    if len(axes) < 3:
        fig, ax = plt.subplots(figsize=(7.5, 3))
        _empty(ax, "no radar: fewer than three axes vary across the arms"
               + (f" (NaN or constant: {', '.join(flat)})" if flat else ""))  # fmt: skip
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return
    values = radar_values(arms, axes)
    colors = _color_map(list(arms))
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(7.5, 7), subplot_kw={"polar": True})
    for name, vals in values.items():
        closed = vals + vals[:1]
        style = _STYLE.get(name, (None, "-"))[1]
        ax.plot(angles + angles[:1], closed, style, color=colors[name], lw=1.6, label=name)
        ax.fill(angles + angles[:1], closed, color=colors[name], alpha=0.05)
    ax.set_xticks(angles)
    ax.set_xticklabels(axes, fontsize=9)
    ax.tick_params(axis="x", pad=14)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels(["", "", "", ""])
    ax.set_ylim(0, 1.05)
    left_out = f"\nleft out, NaN or constant across arms: {', '.join(flat)}" if flat else ""
    ax.set_title("Profiles (each axis min-max scaled across base and arms; outer = best)"
                 + left_out, fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.32, 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_scatter(arms: dict, x: str, y: str, path: str) -> None:
    """One point per arm with 95% CI whiskers, e.g. diversity against pass@1."""
    plt = _plt()
    colors = _color_map(list(arms))
    fig, ax = plt.subplots(figsize=(6.5, 5))
    drawn = 0
    for name, arm in arms.items():
        sx, sy = arm["scalars"].get(x), arm["scalars"].get(y)
        if not sx or not sy or not np.isfinite([sx["mean"], sy["mean"]]).all():
            continue
        drawn += 1
        xerr = [[sx["mean"] - sx.get("lo", sx["mean"])], [sx.get("hi", sx["mean"]) - sx["mean"]]]
        yerr = [[sy["mean"] - sy.get("lo", sy["mean"])], [sy.get("hi", sy["mean"]) - sy["mean"]]]
        ax.errorbar(sx["mean"], sy["mean"], xerr=xerr, yerr=yerr, fmt="o", color=colors[name],
                    capsize=3, label=name)  # fmt: skip
    if not drawn:
        _empty(ax, f"no arm has finite {x} and {y}")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} against {x} (95% CIs)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_central(arms: dict, path: str) -> None:
    """The seed's central picture: one point per arm placed by supervision density (bits per
    trained token, log scale), on-policy-ness (state locality: ~0 when the arm trained on the
    states it now visits) and, by colour, diversity."""
    plt = _plt()
    pts = [(n, a["supervision_bits_per_token"], a["scalars"].get("state_locality", {}).get("mean"),
            a["scalars"].get("diversity", {}).get("mean")) for n, a in arms.items()
           if a.get("supervision_bits_per_token") and not a.get("diverged")]  # fmt: skip
    pts = [p for p in pts if p[2] is not None and np.isfinite([p[1], p[2]]).all()]
    fig, ax = plt.subplots(figsize=(7, 5))
    if pts:
        names, x, y, div = zip(*pts)
        div = [d if d is not None else np.nan for d in div]
        sc = ax.scatter(x, y, c=div, cmap="viridis", s=70, edgecolors="k")
        for n, xi, yi in zip(names, x, y):
            ax.annotate(n, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
        fig.colorbar(sc, ax=ax, label="diversity (P[two correct samples differ])")
        ax.set_xscale("log")
        ax.margins(x=0.25)  # room for the labels of the rightmost arms
    else:
        _empty(ax, "no arm has a supervision density and a state locality")
    ax.set_xlabel("supervision bits per trained token (log)")
    ax.set_ylabel("state locality (NLL on training states − on own samples)")
    ax.set_title("Supervision density × on-policy-ness × diversity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_training(arms: dict, path: str, keys: Sequence[str] = ("loss", "pass_rate")) -> None:
    """Training curves of every arm that has a history: one panel per metric."""
    plt = _plt()
    trained = {n: a["history"] for n, a in arms.items() if a.get("history")}
    colors = _color_map(list(arms))
    fig, axs = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axs[0], keys):
        for name, hist in trained.items():
            pts = [(h["step"], h[key]) for h in hist if key in h and h[key] is not None]
            if pts:
                s, v = zip(*pts)
                ax.plot(s, v, color=colors[name], label=name, lw=1.4)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"training {key}")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
        else:
            _empty(ax, f"no arm logged {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _fmt(s: dict | None) -> str:
    if not s:
        return "–"
    if "lo" in s and "hi" in s:
        return f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"
    return f"{s['mean']:.3f}"


def _signed(s: dict) -> str:
    return f"{s['mean']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}]"


def _setting(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in v.items())
    return str(v)


def write_report(workdir: str, metrics: dict) -> dict[str, str]:
    """Write metrics.json, the plots and report.md into `workdir`; return their paths."""
    os.makedirs(workdir, exist_ok=True)
    arms = metrics["arms"]
    paths = {
        "metrics": os.path.join(workdir, "metrics.json"),
        "pass_at_k": os.path.join(workdir, "pass_at_k.png"),
        "cot_pass_at_k": os.path.join(workdir, "cot_pass_at_k.png"),
        "radar": os.path.join(workdir, "radar.png"),
        "diversity": os.path.join(workdir, "diversity_vs_pass1.png"),
        "training": os.path.join(workdir, "training.png"),
        "central": os.path.join(workdir, "density_locality_diversity.png"),
        "report": os.path.join(workdir, "report.md"),
    }
    with open(paths["metrics"], "w") as f:
        json.dump(metrics, f, indent=1, default=float)
    plot_curves(arms, "pass@k", paths["pass_at_k"], "pass@k (unbiased estimator, 95% CI)")
    plot_curves(arms, "cot_pass@k", paths["cot_pass_at_k"], "CoT-pass@k: answer and chain correct")
    plot_radar(arms, metrics["radar_axes"], paths["radar"])
    plot_scatter(arms, "pass@1", "diversity", paths["diversity"])
    plot_training(arms, paths["training"])
    plot_central(arms, paths["central"])

    scalar_names: list[str] = []
    for arm in arms.values():
        for k in arm["scalars"]:
            if k not in scalar_names:
                scalar_names.append(k)
    lines = ["# jaxpost head-to-head: SFT vs RL vs on-policy distillation", ""]
    if metrics.get("smoke_test"):
        lines += ["> **Smoke test** (the `tiny` variant): budgets of seconds, so every number "
                  "below only shows that the pipeline runs end to end; no verdict or metric of "
                  "this report says anything about the paradigms.", ""]  # fmt: skip
    settings = metrics.get("settings", {})
    if settings:
        lines += ["## Setup", ""] + [f"- **{k}**: {_setting(v)}" for k, v in settings.items()]
        lines.append("")
    res = metrics.get("resolution")
    if res:
        lines += [f"Resolution: with {res['problems']} held-out problems this evaluation detects "
                  f"a pass@1 difference from the base of about {res['pass@1_mde']:.3f} (80% "
                  f"power, two-sided 5%; per-problem SD {res['sd']:.3f}, {res['from']}); "
                  f"smaller effects read as inconclusive.", ""]  # fmt: skip
    lines += ["## Claims from the literature, tested on this run", ""]
    lines += ["| claim | source | verdict | evidence |", "|---|---|---|---|"]
    for c in metrics.get("claims", []):
        lines.append(f"| {c['claim']} | {c['source']} | **{c['verdict']}** | {c['evidence']} |")
    lines += ["", "## Metrics (mean [95% bootstrap CI] over held-out prompts)", ""]
    lines.append("| arm | " + " | ".join(scalar_names) + " |")
    lines.append("|---|" + "---|" * len(scalar_names))
    for name, arm in arms.items():
        row = [_fmt(arm["scalars"].get(k)) if not arm.get("diverged") else "diverged"
               for k in scalar_names]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    gains = {n: a["gain_vs_base"] for n, a in arms.items() if a.get("gain_vs_base")}
    if gains:
        lines += ["", "## Gain over the base (paired over problems, 95% CI)", "",
                  "| model | pass@1 − base | pass@large_k − base |", "|---|---|---|"]
        lines += [f"| {n} | {_signed(g['pass@1'])} | {_signed(g['pass@large_k'])} |"
                  for n, g in gains.items()]  # fmt: skip
    weighted = {n: a["importance"] for n, a in arms.items() if a.get("importance")}
    if weighted:
        lines += ["", "## Importance correction π_old/q over training (GRPO arms)", "",
                  "| arm | ratio min | ratio mean | ratio max | tokens whose weight was cut |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {w['ratio_min']:.3g} | {w['ratio_mean']:.3g} | {w['ratio_max']:.3g} "
                  f"| {w['corrected_frac']:.3f} |" for n, w in weighted.items()]  # fmt: skip
    feet = {n: a["sparse_footprint"] for n, a in arms.items() if a.get("sparse_footprint")}
    if feet:
        top = next(k for k in next(iter(feet.values())) if k.startswith("promoted_in_top"))
        lines += ["", "## Sparse footprint: where the greedy choice left the base's (on the "
                  "base's own samples)", "",
                  f"| model | positions changed | base entropy there / overall (nats) | base rank "
                  f"of the new argmax, mean / median | in the base's top {top[15:]} |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {f['flip_frac']:.4f} ({f['flips']}) | {f['entropy_at_flips']:.3g} / "
                  f"{f['entropy_all']:.3g} | {f['promoted_rank_mean']:.3g} / "
                  f"{f['promoted_rank_median']:.3g} | {f[top]:.3f} |"
                  for n, f in feet.items()]  # fmt: skip
    diverged = {n: a["diverged"] for n, a in arms.items() if a.get("diverged")}
    if diverged:
        lines += ["", "## Diverged arms (not evaluated; no claim uses them)", ""]
        lines += [f"- **{n}**: {why}" for n, why in diverged.items()]
    lines += ["", "## Plots", ""]
    for key in ("central", "pass_at_k", "cot_pass_at_k", "radar", "diversity", "training"):
        lines.append(f"![{key}]({os.path.basename(paths[key])})")
    notes = metrics.get("notes", [])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    with open(paths["report"], "w") as f:
        f.write("\n".join(lines) + "\n")
    return paths
