"""Plasticity: which property of an SFT checkpoint predicts how far RL then takes it?

"Quagmires in SFT-RL Post-Training" (2510.01624) asks whether the SFT checkpoint that looks best
is the one RL improves most. `run` builds several SFT starting points from one base (SFT steps ×
data slice), runs the same GRPO from each (the head-to-head's `grpo` arm and budget), and
reports how well each predictor measured before RL ranks the pass@1 after it:

    sft_pass@1       pass@1 of the SFT checkpoint
    sft_pass@large_k pass@k at k = eval.samples
    heldout_nll      per-token NLL of reference solutions of the held-out problems (lower is
                     better: ranked by its negative)

Spearman's rho between each predictor and post-RL pass@1 over the starting points, with a 95%
bootstrap CI over held-out problems (each resample recomputes every point's means on the same
problems). Writes plasticity.json, plasticity.md and plasticity.png into the workdir; each point's
result is kept (points/<name>/result.json) and reused by a rerun of the same settings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import numpy as np

from jaxpost import data, evaluate, inputs, loops, metrics, train, workdir
from jaxpost.errors import Preempted, UserError
from jaxpost.headtohead import arms, models, settings
from jaxpost.headtohead.evaluation import forced_logprobs

PREDICTORS = ("sft_pass@1", "sft_pass@large_k", "heldout_nll")


def starting_points(config) -> list[tuple[int, str]]:
    """(SFT steps, slice style) of each point: every steps × style, step 0 (the base) once."""
    p = config.plasticity
    try:
        steps = sorted({int(s) for s in str(p.sft_steps).split(",") if s.strip()})
    except ValueError:
        raise UserError(f"plasticity.sft_steps must list integers, got {p.sft_steps!r}") from None
    styles = [s.strip() for s in str(p.styles).split(",") if s.strip()]
    if not steps or min(steps) < 0 or not styles:
        raise UserError(f"plasticity needs sft_steps >= 0 and a style, got {p.sft_steps!r}, "
                        f"{p.styles!r}")  # fmt: skip
    points = [(k, s) for k in steps for s in styles if k > 0]
    if 0 in steps:
        points.insert(0, (0, "base"))
    if len(points) < 3:
        raise UserError(f"plasticity needs at least 3 starting points to rank, got {points}")
    return points


def _sft(w, base: inputs.Model, steps: int, style: str, path: str) -> inputs.Model:
    c = w.config
    pairs = w.task.sft_examples(w.train, style=style, per_problem=4, seed=c.seed + 7)
    examples = inputs.encode_examples(base, pairs, f"plasticity SFT ({style})")
    rows = c.arm.prompts_per_step * c.arm.group_size

    def fit():
        optim = train.OptimConfig(learning_rate=c.plasticity.sft_learning_rate,
                                  warmup_steps=min(10, steps), total_steps=steps)  # fmt: skip
        loop = loops.LoopConfig(steps=steps, batch_size=rows, seed=c.seed + 5,
                                progress=w.progress, desc=f"sft {steps} {style}")  # fmt: skip
        result = loops.run_sft(base.config, base.params, examples, optim, loop,
                               pad_id=base.tokenizer.pad_id, mesh=w.mesh, loss_impl=c.loss_impl)  # fmt: skip
        if result.preempted:
            raise Preempted("plasticity: preempted during an SFT point; rerun to resume")
        return result.params, result.history

    model, _ = inputs.reuse_or_train(path, base, fit)
    return model.on(w.mesh)


def heldout_nll(w, model: inputs.Model) -> np.ndarray:
    """Per held-out problem: mean per-token NLL of `eval.nll_solutions` reference solutions
    drawn uniformly from its full set (the same draws for every model)."""
    k = w.config.plasticity.nll_solutions
    pairs = w.task.sft_examples(w.test, style="all", per_problem=k, seed=w.config.seed + 13)
    enc = inputs.encode_examples(model, pairs, "held-out solutions")
    width = data.round_up(max(len(c) for _, c in enc), 16)
    tokens, mask = data.right_pad([c for _, c in enc], width, model.tokenizer.pad_id)
    lp = forced_logprobs(model, model.params, [p for p, _ in enc], tokens, mask)
    per_row = -(lp.sum(1) / np.maximum(mask.sum(1), 1))
    return per_row.reshape(len(w.test), k).mean(1)


def _evaluate(w, model: inputs.Model, seed: int) -> dict:
    e = w.config.eval
    s = evaluate.sample(model.config, model.params, model.tokenizer, w.task, w.test, n=e.samples,
                        max_new_tokens=w.config.arm.max_new_tokens, seed=seed, mesh=w.mesh)  # fmt: skip
    correct = s.answer_ok.sum(1)
    return {"pass@1": metrics.pass_at_k(e.samples, correct, 1).tolist(),
            "pass@large_k": metrics.pass_at_k(e.samples, correct, e.samples).tolist()}


def rank_predictors(points: list[dict], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Spearman's rho of each predictor against post-RL pass@1 over the points, with a
    percentile-bootstrap 95% CI over problems (`points`: per-problem arrays of each point)."""
    post = np.asarray([p["post_rl_pass@1"] for p in points], np.float64)  # [points, problems]
    n = post.shape[1]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    out = {}
    for name in PREDICTORS:
        x = np.asarray([p[name] for p in points], np.float64)
        sign = -1.0 if name == "heldout_nll" else 1.0  # lower NLL predicts more

        def rho(idx, x=x, sign=sign):
            return metrics.spearman(sign * x[:, idx].mean(1), post[:, idx].mean(1))

        boot = np.asarray([rho(d) for d in draws])
        boot = boot[np.isfinite(boot)]
        lo, hi = (np.quantile(boot, [0.025, 0.975]) if boot.size else (np.nan, np.nan))
        out[name] = {"rho": rho(np.arange(n)), "lo": float(lo), "hi": float(hi)}
    return out


@workdir.holding
def run(config, log=print) -> dict:
    """Build the points, train GRPO from each, rank the predictors; write the report."""
    start = time.perf_counter()
    settings.check(config)
    w = models.world(config)
    base = models.base_and_teacher(w, log, with_teacher=False).base
    rows = []
    for steps, style in starting_points(config):
        name = "base" if steps == 0 else f"sft{steps}_{style.replace(':', '')}"
        key = settings.eval_key(config)  # every setting that matters: a change starts over
        root = os.path.join(config.workdir, "points", f"{name}-{key}")
        saved = os.path.join(root, "result.json")
        if os.path.exists(saved):
            with open(saved) as f:
                row = json.load(f)
            if row.get("key") == key:
                log(f"{name}: reusing")
                rows.append(row)
                continue
        log(f"{name}: SFT {steps} steps on '{style}'")
        model = base if steps == 0 else _sft(w, base, steps, style, os.path.join(root, "sft"))
        before = _evaluate(w, model, config.seed)
        nll = heldout_nll(w, model)
        point_config = copy.deepcopy(config)
        point_config.workdir = root
        pw = dataclasses.replace(w, config=point_config)
        result = arms.run_arm(pw, "grpo", models.Models(model, model, {}, {}), log)
        if result.preempted:
            raise Preempted(f"{name}: preempted during GRPO; rerun to resume from its checkpoint")
        after = _evaluate(w, model.replace(params=result.params), config.seed)
        row = {"key": key, "name": name, "sft_steps": steps, "style": style,
               "sft_pass@1": before["pass@1"], "sft_pass@large_k": before["pass@large_k"],
               "heldout_nll": nll.tolist(), "post_rl_pass@1": after["pass@1"]}  # fmt: skip
        os.makedirs(root, exist_ok=True)
        with open(saved, "w") as f:
            json.dump(row, f)
        rows.append(row)
    out = {"points": [{k: (float(np.mean(v)) if isinstance(v, list) else v)
                       for k, v in r.items() if k != "key"} for r in rows],  # fmt: skip
           "predictors": rank_predictors(rows, seed=config.seed),
           "problems": len(w.test), "wall_seconds": round(time.perf_counter() - start, 1)}
    write_report(config.workdir, out)
    return out


def write_report(path: str, out: dict) -> None:
    """plasticity.json, plasticity.md (points and predictors) and plasticity.png (scatter)."""
    with open(os.path.join(path, "plasticity.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = ["# Plasticity: does the SFT checkpoint predict what RL makes of it?", "",
             "| point | SFT steps | slice | SFT pass@1 | SFT pass@large_k | held-out NLL | "
             "post-RL pass@1 |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {p['name']} | {p['sft_steps']} | {p['style']} | {p['sft_pass@1']:.3f} | "
              f"{p['sft_pass@large_k']:.3f} | {p['heldout_nll']:.3f} | {p['post_rl_pass@1']:.3f} |"
              for p in out["points"]]  # fmt: skip
    lines += ["", f"Spearman's rho with post-RL pass@1 over {len(out['points'])} points (95% "
              f"bootstrap CI over {out['problems']} held-out problems; held-out NLL ranked by its "
              f"negative):", "", "| predictor | rho | 95% CI |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['rho']:+.2f} | [{v['lo']:+.2f}, {v['hi']:+.2f}] |"
              for k, v in out["predictors"].items()]  # fmt: skip
    with open(os.path.join(path, "plasticity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PREDICTORS), figsize=(4 * len(PREDICTORS), 3.4))
    y = [p["post_rl_pass@1"] for p in out["points"]]
    for ax, name in zip(axes, PREDICTORS):
        x = [p[name] for p in out["points"]]
        ax.scatter(x, y)
        for p, xi, yi in zip(out["points"], x, y):
            ax.annotate(p["name"], (xi, yi), fontsize=7)
        r = out["predictors"][name]
        ax.set_title(f"{name}: rho {r['rho']:+.2f}", fontsize=9)
        ax.set_xlabel(name)
    axes[0].set_ylabel("post-RL pass@1")
    fig.tight_layout()
    fig.savefig(os.path.join(path, "plasticity.png"), dpi=110)
    plt.close(fig)
