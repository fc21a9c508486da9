"""The whole head-to-head: models, arms, evaluations, claims, the report; resumable.

    result = headtohead.run(config)     # config: experiments/configs/paradigms.py's ConfigDict

Interrupted runs pick up where they stopped: cached models (by `settings.model_key`), arms with
an eval.json of this `eval_key`, and an arm's latest checkpoint when its directory holds this
`arm_key`'s training (a directory trained under other settings is moved aside, not resumed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxpost import data, distributed, inputs, losses, report, workdir
from jaxpost.errors import Preempted, UserError
from jaxpost.headtohead import arm_runs, arms, claims, evaluation, models, settings
from jaxpost.headtohead.evaluation import Evaluation
from jaxpost.inputs import Model

RADAR_AXES = ("pass@1", "pass@large_k", "diversity", "retention", "steerability", "efficiency")
REFERENCES = ("base", "teacher", "teacher_degraded")  # evaluated models that are not arms


def _check_memory(w: models.World, student: Model, teacher_config) -> None:
    """Plan every step the run will compile, before it trains anything (`jaxpost.plan`): the
    base's and teacher's SFT on the mixture, the SFT arm on its sequences, GRPO and OPD on their
    rollouts (OPD with the teacher beside the student, its widest divergence, the mixture of
    alpha = 0.5; OPSD with the student as teacher on the privileged prompts), each with the
    largest sampler cache of the run (training rollouts or evaluation chunks)."""
    c, a = w.config, w.config.arm
    cfg = student.config
    for model in (student, student.replace(config=teacher_config)):  # both sample held-out prompts
        inputs.encode_prompts(model, [w.task.render_prompt(p) for p in w.test],
                              max_new_tokens=a.max_new_tokens, what="evaluation prompts")  # fmt: skip

    def width(texts, what: str) -> int:
        enc = inputs.encode_prompts(student, texts, max_new_tokens=a.max_new_tokens, what=what)
        return data.round_up(max(len(t) for t in enc), inputs.PAD_MULTIPLE)

    rows = a.prompts_per_step * a.group_size
    sampled = max(rows, evaluation.sample_rows(w))
    prompt = width([w.task.render_prompt(p) for p in w.arm_problems], "training prompts")
    privileged = width(arms.opsd_teacher_texts(w), "OPSD teacher prompts")
    if c.base.steps > 0 or not c.teacher:
        texts = (models.mixture(w, c.base.style, c.seed)
                 + models.mixture(w, models.teacher_style(c), c.seed + 1))
        seq = data.pair_width(inputs.encode_examples(student, texts, "base and teacher data"))
        inputs.check_memory(cfg, w.mesh, objective="sft", batch=c.base.batch_size, seq_len=seq,
                            loss_impl=c.loss_impl)  # fmt: skip
    common = dict(loss_impl=c.loss_impl, batch=rows, sample_batch=sampled)
    inputs.check_memory(cfg, w.mesh, objective="sft", seq_len=data.pair_width(arms.sft_examples(w, student)),
                        **common)  # fmt: skip
    on_policy = dict(prompt_len=prompt, completion_len=a.max_new_tokens, **common)
    inputs.check_memory(cfg, w.mesh, objective="grpo", **on_policy)
    inputs.check_memory(cfg, w.mesh, objective="opd", teacher_config=teacher_config,
                        distill_loss=losses.opd_kl(0.5), **on_policy)  # fmt: skip
    inputs.check_memory(cfg, w.mesh, objective="opd", teacher_config=cfg,
                        teacher_prompt_len=privileged, **on_policy)  # fmt: skip


@workdir.holding
def run(config, log: Callable[[str], None] = print) -> dict:
    """Run the protocol (reusing whatever an earlier run of the same settings left) and write
    the report; returns the metrics dictionary the report was rendered from."""
    start = time.perf_counter()
    if jax.process_count() > 1:  # caches, reports and arm directories assume one writer
        raise UserError(f"the head-to-head runs in one process (a mesh over its local devices); "
                        f"this job has {jax.process_count()} processes: launch it on one host")  # fmt: skip
    names = arms.arm_names(config)
    settings.check(config)
    arm_runs.use_compilation_cache(config.workdir, log)
    w = models.world(config)
    log(distributed.describe(w.mesh))
    if w.task.needs_pretrained and not settings.pretrained(config):
        raise UserError(f"task {w.task.name} needs a pretrained --model=DIR and the pretrained "
                        f"variant (the built-in base is a character-level model trained here)")  # fmt: skip
    m = models.base_and_teacher(w, log, check=lambda s, t: _check_memory(w, s, t))
    stages = {"models": time.perf_counter() - start, "evaluation": 0.0, "arm_training": 0.0}
    log(f"models ready ({stages['models']:.0f} s)")
    eval_key = settings.eval_key(config)
    evals: dict[str, Evaluation] = {}
    extras: dict[str, dict] = {}
    diverged: dict[str, str] = {}  # arm -> why it stopped (no evaluation, no claims)

    def references() -> Evaluation:
        """Evaluate the base (always here: the other models' paired metrics need its samples),
        the teacher (cached) and, for opd_degraded's claim, its weakened teacher."""
        log("evaluating base")
        t0 = time.perf_counter()
        evals["base"] = evaluation.evaluate_model(w, m.base, m.base.params, seed=config.seed)
        log("evaluating teacher")
        teacher_eval = os.path.join(config.workdir, "models", "teacher_eval.json")
        evals["teacher"] = arm_runs.load_eval(teacher_eval, eval_key)
        if evals["teacher"] is None:
            evals["teacher"] = evaluation.evaluate_model(w, m.teacher, m.teacher.params,
                                                         base=evals["base"], base_model=m.base,
                                                         seed=config.seed)  # fmt: skip
            arm_runs.save_eval(teacher_eval, eval_key, evals["teacher"])
        if "opd_degraded" in names:  # the claim compares the arm with its weakened teacher
            log("evaluating teacher_degraded")
            weak = arms.degraded_teacher(m, config)
            evals["teacher_degraded"] = evaluation.evaluate_model(
                w, weak, weak.params, base=evals["base"], base_model=m.base, seed=config.seed)
        stages["evaluation"] += time.perf_counter() - t0
        return evals["base"]

    pending = []
    for arm in names:
        saved = arm_runs.load_arm(config, arm, eval_key)
        if saved is None:
            pending.append(arm)
        elif saved.diverged is not None:
            log(f"{arm}: diverged in an earlier run of these settings ({saved.diverged})")
            diverged[arm] = saved.diverged
        else:
            log(f"{arm}: reusing finished arm")
            evals[arm], extras[arm] = saved.evaluation, saved.extra
    processes = settings.arm_processes(config)
    if pending and processes > 1:  # the arms at once, one process per core
        # imported here: `python -m jaxpost.headtohead.parallel` (its workers) imports this
        # package first and must find the module not yet loaded
        from jaxpost.headtohead import parallel

        t0 = time.perf_counter()
        outcomes = parallel.run_arms(config, pending, processes, references, log)
        # one stage from the workers' start: their arms' training and evaluation, which
        # overlap each other and the references' evaluation (arms' own seconds: `extras`)
        del stages["arm_training"]
        stages["arms"] = time.perf_counter() - t0
        for arm in outcomes.finished:  # each worker saved its arm's eval.json
            saved = arm_runs.load_arm(config, arm, eval_key)
            evals[arm], extras[arm] = saved.evaluation, saved.extra
        diverged.update(outcomes.diverged)
        left = [a for a in pending if a not in outcomes.finished and a not in diverged]
        if outcomes.preempted and left:
            raise Preempted(f"preempted (SIGTERM) with arms {', '.join(left)} unfinished; the "
                            f"finished arms and the running arms' checkpoints are saved; rerun "
                            f"the same command to resume")  # fmt: skip
    if not pending or processes == 1:
        references()
    for arm in pending if processes == 1 else ():
        outcome = arm_runs.train_and_evaluate(w, m, arm, lambda: evals["base"], log)
        if outcome.diverged is not None:
            diverged[arm] = outcome.diverged
            continue
        evals[arm], extras[arm] = outcome.evaluation, outcome.extra
        stages["arm_training"] += outcome.extra["train_seconds"]
        stages["evaluation"] += outcome.extra["eval_seconds"]
    result = assemble(w, evals, extras, m.history, m.describe, diverged, m.base.config.vocab_size)
    result["settings"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    # this run's own work; what a rerun reused from the workdir costs nothing here
    result["settings"]["wall_seconds_by_stage"] = {k: round(v, 1) for k, v in stages.items()}
    paths = report.write_report(config.workdir, result)
    log(f"report: {paths['report']}")
    return result


def resolution(evals: dict[str, Evaluation], samples: int) -> dict:
    """The smallest pass@1 difference from the base this evaluation detects with 80% power at
    a two-sided 5% level: 2.8 · SD / sqrt(problems). SD is the larger of the median, over the
    other models, of the spread of their per-problem differences from the base, and the
    sampling noise alone (two evaluations of one model differ per problem with variance
    2·p(1-p)/`samples`, p clipped to [1/samples, 1 - 1/samples] so a model that never or always
    succeeds still has the resolution its sample count gives)."""
    base = np.asarray(evals["base"].per_problem["pass@1"], float)
    n = len(base)
    p = np.clip(base, 1 / samples, 1 - 1 / samples)
    noise = float(np.sqrt(np.mean(2 * p * (1 - p) / samples)))
    sds = [np.std(np.asarray(ev.per_problem["pass@1"], float) - base, ddof=1)
           for name, ev in evals.items() if name != "base" and n > 1]  # fmt: skip
    paired = float(np.median(sds)) if sds else 0.0
    sd, source = ((paired, "median paired SD over the other models") if paired > noise
                  else (noise, "sampling noise"))  # fmt: skip
    return {"pass@1_mde": 2.8 * sd / np.sqrt(max(n, 1)), "problems": n, "sd": sd,
            "from": source}


def assemble(w: models.World, evals: dict[str, Evaluation], extras: dict[str, dict],
             pre_hist: dict, describe: dict, diverged: dict | None = None, vocab: int = 0
             ) -> dict:  # fmt: skip
    """The report's metrics dictionary from the evaluations (see `jaxpost.report`); a diverged
    arm has its reason and training curve, no scalars. `vocab`: the student's vocabulary size
    (what a token or a distribution of supervision carries, `arms.supervision_bits`)."""
    c = w.config
    base_p1 = evals["base"].scalars["pass@1"]["mean"]
    out_arms = {}
    for name, ev in evals.items():
        scalars = dict(ev.scalars)
        extra = extras.get(name, {})
        if name == "base":
            scalars["efficiency"] = {"mean": 0.0}  # no tokens spent, nothing gained
        if "tokens" in extra:
            gain = scalars["pass@1"]["mean"] - base_p1
            scalars["efficiency"] = {"mean": gain / max(extra["tokens"], 1.0) * 1e3}
            scalars["state_locality"] = {"mean": extra.get("state_locality", float("nan"))}
        reference = name in REFERENCES
        out_arms[name] = {
            "kind": "reference" if reference else "arm",
            "curves": ev.curves,
            "scalars": scalars,
            "history": [] if reference else arm_runs.history(os.path.join(c.workdir, "arms", name)),
        }
        if name != "base":  # paired over problems, as the claims are
            out_arms[name]["gain_vs_base"] = {
                k: claims.paired(ev.per_problem[k], evals["base"].per_problem[k]).as_dict()
                for k in ("pass@1", "pass@large_k")}  # fmt: skip
        if ev.footprint is not None:
            out_arms[name]["sparse_footprint"] = ev.footprint
        hist = out_arms[name]["history"]
        if any(h.get("is_ratio_mean") is not None for h in hist):  # GRPO's importance weights

            def seen(key, hist=hist):  # a non-finite value was logged as None
                return [h[key] for h in hist if h.get(key) is not None] or [float("nan")]

            out_arms[name]["importance"] = {
                "ratio_min": min(seen("is_ratio_min")),
                "ratio_mean": float(np.mean(seen("is_ratio_mean"))),
                "ratio_max": max(seen("is_ratio_max")),
                "corrected_frac": float(np.mean(seen("is_corrected_frac")))}  # fmt: skip
        if name in arms.ARMS:
            lengths = [h["completion_len"] for h in out_arms[name]["history"]
                       if h.get("completion_len")]  # fmt: skip
            out_arms[name]["supervision_bits_per_token"] = arms.supervision_bits(
                arms.ARMS[name].kind, vocab, float(np.mean(lengths)) if lengths else None)
    for name, reason in (diverged or {}).items():
        out_arms[name] = {"kind": "arm", "diverged": reason, "curves": {}, "scalars": {},
                          "history": arm_runs.history(os.path.join(c.workdir, "arms", name))}  # fmt: skip
    a, e = c.arm, c.eval
    steering = (f"; steering: {e.steer_problems} prompts × {e.steer_samples}" if w.steer
                else "; steerability not measured (the task has no steering probe)")  # fmt: skip
    settings_ = {
        "task": w.task.describe(),
        "student": describe["student"],
        "base": describe["base"],
        "teacher": describe["teacher"],
        "budget per arm": f"{a.steps} steps × {a.prompts_per_step} prompts × {a.group_size} "
                          f"samples, lr {a.learning_rate}"
                          + (f", {a.updates_per_batch} updates per batch (GRPO, OPD and OPSD arms)"
                             if a.updates_per_batch > 1 else "")
                          + f", ≤ {a.max_new_tokens} new tokens, "
                          f"rollouts at temperature {a.temperature}, top-p {a.top_p}; GRPO "
                          f"weighted by π_old/q ({a.is_mode}, ≤ {a.is_max}); on "
                          + (f"{a.fresh_problems} training problems the base never saw"
                             if a.fresh_problems else "the base's training problems"),
        "budget": {"arm_steps": a.steps, "prompts_per_step": a.prompts_per_step,
                   "group_size": a.group_size, "updates_per_batch": a.updates_per_batch,
                   "rollouts_per_arm": a.steps * a.prompts_per_step * a.group_size},
        "evaluation": f"{e.problems} held-out problems × {e.samples} samples at temperature 1; "
                      f"retention: {e.retention_problems} addition problems × "
                      f"{e.retention_samples}{steering}",
        "arms": ", ".join(f"{n} ({arms.ARMS[n].help})" for n in out_arms if n in arms.ARMS),
        "efficiency": "pass@1 gained over the base per 1k sampled (on-policy) or trained (SFT) "
                      "tokens",
        "seed": c.seed,
    }  # fmt: skip
    if c.mesh or c.loss_impl != "auto":
        settings_["devices"] = f"mesh {c.mesh or 'none'}; loss_impl {c.loss_impl}"
    notes = [
        "pass@large_k is pass@k at k = the number of samples per problem. diversity is the "
        "chance that two of a problem's correct samples are different solutions (what "
        "`task.diversity_key` counts as distinct: canonical solutions on Countdown, reasoning "
        "paths on GSM8K), 1 - collision rate (Gini-Simpson), averaged over the problems where "
        "the model has at least 2 correct samples: unbiased whatever that number. "
        "solution_entropy is the plug-in entropy (nats) of the correct samples' solutions, "
        "biased low by about (solutions - 1) / 2c for c of them, so a model that is correct "
        "less often reads narrower with the same spread; the diversity claims compare two "
        "models' entropies at equal numbers of correct samples.",
        "kl_from_base: KL(base || model) on the base's own samples, summed over tokens, "
        "estimated per token by r - 1 - log r with r = model/base probability (unbiased and "
        "never negative; the teacher's is large when it is another architecture or was trained "
        "on other data).",
        "state_locality: per-token NLL of the final policy on its last training batch minus on "
        "its own samples (≈0 for on-policy training).",
        "rank_bias: Spearman correlation, within each problem, between the base's sequence "
        "logprob of a correct sample and its change under the arm (He et al.).",
    ]
    if any(pre_hist.values()):
        notes.append("Pretraining curves (loss) of base/teacher: final loss "
                     + ", ".join(f"{k} {v[-1]['loss']:.3f}" for k, v in pre_hist.items() if v))
    axes = [x for x in RADAR_AXES if w.steer is not None or x != "steerability"]
    return {
        "resolution": resolution(evals, e.samples),
        "smoke_test": c.variant == "tiny",
        "arms": out_arms,
        "radar_axes": axes,
        "claims": claims.claims(evals),
        "settings": settings_,
        "notes": notes,
    }
