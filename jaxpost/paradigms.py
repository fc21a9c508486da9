"""The head-to-head protocol: one base model, one budget, every paradigm, one report.

    result = paradigms.run(paradigms.Settings(workdir="/tmp/jaxpost_paradigms"))

1. Models (cached in `workdir/models/`). The *base* student is SFT-trained on a mixture of the
   retention task (addition), a narrow slice of Countdown solutions (`base_style`, by default
   only solutions whose canonical chain opens with "+", so most valid solutions are unlikely
   under it), steering prompts and privileged-context prompts (so it can read a reference
   solution, which OPSD needs). The *teacher* is the base trained longer on the same mixture
   with the full Countdown solution distribution.
2. Arms (`workdir/arms/<arm>/`), each starting from the base with the same budget: `arm_steps`
   updates over `prompts_per_step × group_size` sequences each (SFT trains on that many dataset
   sequences; the on-policy arms sample that many).
3. Evaluation of base, teacher and every arm on held-out problems (`eval_samples` per problem at
   temperature 1): pass@k / CoT-pass@k curves, coverage and support change against the base,
   solution-set coverage, diversity, retention (addition), steerability, state locality, rank
   bias, KL from the base, supervision efficiency, with bootstrap 95% CIs over problems.
4. `report.write_report`: report.md, metrics.json and the plots; the literature's claims are
   judged by paired bootstrap CIs over problems computed in this run.

Interrupted runs pick up where they stopped: cached models, arms with an `eval.json` and an arm's
latest checkpoint are reused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import data, evaluate, loops, losses, metrics, models, report, train
from jaxpost.metrics_log import read_metrics
from jaxpost.models import ModelConfig, hf
from jaxpost.tasks import addition, countdown, steer
from jaxpost.tokenizers import CharTokenizer

ARMS = ("sft", "grpo", "grpo_unlikely", "opd_fkl", "opd_jsd", "opd_rkl", "opd_entropy",
        "opd_prefix", "opsd")  # fmt: skip
ARM_HELP = {
    "sft": "SFT on dataset solutions drawn from the full solution set",
    "grpo": "GRPO with the verifier's 0/1 reward",
    "grpo_unlikely": "GRPO with He et al.'s unlikeliness reward (rank by base-policy logprob)",
    "opd_fkl": "OPD, forward KL(p_T || p_S) (alpha=0)",
    "opd_jsd": "OPD, generalized JSD (alpha=0.5)",
    "opd_rkl": "OPD, reverse KL(p_S || p_T) (alpha=1)",
    "opd_entropy": "entropy-aware OPD (reverse KL, forward KL where the teacher is uncertain)",
    "opd_prefix": "prefix OPD (reverse KL on the first prefix_len completion tokens)",
    "opsd": "OPSD: teacher = frozen base seeing a reference solution in its prompt",
}
RADAR_AXES = ("pass@1", "pass@large_k", "diversity", "retention", "steerability", "efficiency")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run. Defaults finish in about ten minutes on a 2-core CPU."""

    workdir: str
    arms: tuple[str, ...] = ARMS
    seed: int = 0
    # Countdown: three numbers in number_range, targets with >= min_solutions solutions.
    number_range: tuple[int, int] = (1, 12)
    target_range: tuple[int, int] = (10, 60)
    min_solutions: int = 2
    train_problems: int = 600
    base_style: str = "first_op:+"
    addition_digits: tuple[int, int] = (2, 2)
    # the student architecture (the "small" preset with these fields replaced)
    d_model: int = 96
    n_layers: int = 3
    head_dim: int = 24
    mlp_dim: int = 256
    # base and teacher SFT
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    base_steps: int = 400
    teacher_steps: int = 300
    # the arms' common budget
    arm_steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    arm_lr: float = 1e-4
    max_new_tokens: int = 32
    beta_rank: float = 0.25
    prefix_len: int = 8
    # evaluation
    eval_problems: int = 48
    eval_samples: int = 64
    retention_problems: int = 64
    retention_samples: int = 4
    steer_problems: int = 32
    steer_samples: int = 16
    progress: bool = True

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms repeat: {self.arms}")
        for name in ("train_problems", "base_steps", "teacher_steps", "arm_steps",
                     "prompts_per_step", "eval_problems", "retention_problems",
                     "steer_problems", "retention_samples", "steer_samples", "pretrain_batch",
                     "max_new_tokens", "prefix_len"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO needs a group), got {self.group_size}")
        if self.eval_samples < 2:
            raise ValueError(f"eval_samples must be >= 2 for pass@k curves, got {self.eval_samples}")
        if not (self.pretrain_lr > 0 and self.arm_lr > 0):
            raise ValueError("learning rates must be > 0")
        countdown.select_solutions([], self.base_style)  # raises on an unknown style

    def model_key(self) -> str:
        """Hash of the fields the base and teacher depend on (the model cache's key)."""
        fields = ("seed", "number_range", "target_range", "min_solutions", "train_problems",
                  "base_style", "addition_digits", "d_model", "n_layers", "head_dim", "mlp_dim", "pretrain_batch",
                  "pretrain_lr", "base_steps", "teacher_steps")  # fmt: skip
        blob = json.dumps({f: getattr(self, f) for f in fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def arm_key(self) -> str:
        """Hash of everything an arm's result depends on."""
        blob = json.dumps(dataclasses.asdict(self) | {"workdir": "", "arms": [], "progress": 0},
                          sort_keys=True, default=list)  # fmt: skip
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def miniature(workdir: str, **overrides) -> Settings:
    """A seconds-scale protocol (for tests): every arm, tiny budgets, few prompts."""
    small = dict(train_problems=40, d_model=32, n_layers=1, head_dim=16, mlp_dim=64,
                 pretrain_batch=16, base_steps=6, teacher_steps=4, arm_steps=2,
                 prompts_per_step=2, group_size=2, max_new_tokens=24, eval_problems=4,
                 eval_samples=4, retention_problems=4, retention_samples=2, steer_problems=3,
                 steer_samples=2, progress=False)  # fmt: skip
    return Settings(workdir=workdir, **(small | overrides))


# ---------------------------------------------------------------------------------------------
# tasks, data, models


@dataclasses.dataclass
class _World:
    """The tasks, tokenizer and problem sets shared by every stage of a run."""

    settings: Settings
    tok: CharTokenizer
    cd: countdown.Countdown
    add: addition.Addition
    steer: steer.Steer
    train: list
    test: list
    add_test: list
    steer_test: list


def _world(s: Settings) -> _World:
    cd = countdown.Countdown(num_numbers=(3, 3), number_range=s.number_range,
                             target_range=s.target_range, min_solutions=s.min_solutions)  # fmt: skip
    add = addition.Addition(digits=s.addition_digits)
    st = steer.Steer(countdown=cd)
    return _World(
        settings=s, tok=CharTokenizer(), cd=cd, add=add, steer=st,
        train=cd.prompts("train", s.train_problems, s.seed),
        test=cd.prompts("test", s.eval_problems, s.seed),
        add_test=add.prompts("test", s.retention_problems, s.seed),
        steer_test=st.prompts("test", s.steer_problems, s.seed),
    )  # fmt: skip


def _mixture(w: _World, style: str, seed: int) -> list[tuple[str, str]]:
    """Countdown solutions of `style` plus addition, steering and privileged-context examples."""
    rng = np.random.default_rng([seed, 11])
    pairs = countdown.sft_pairs(w.cd, w.train, style=style, per_problem=2, seed=seed)
    n = max(len(pairs) // 2, 8)
    for p in w.add.prompts("train", n, seed):
        pairs.append((w.add.render_prompt(p), w.add.render_completion(p, w.add.solutions(p)[0])))
    for p in w.steer.prompts("train", max(n // 2, 4), seed):
        sols = w.steer.compliant_solutions(p)
        pairs.append((w.steer.render_prompt(p), w.steer.render_completion(p, sols[rng.integers(len(sols))])))
    for p in w.train[: max(n // 2, 4)]:
        sols = w.cd.solutions(p)
        solution = sols[int(rng.integers(len(sols)))]
        view = countdown.privileged_view(w.cd, p, solution)
        pairs.append((view.teacher_prompt, w.cd.render_completion(p, solution)))
    return pairs


def student_config(s: Settings) -> ModelConfig:
    return models.get_config("small", vocab_size=CharTokenizer.vocab_size, d_model=s.d_model,
                             n_layers=s.n_layers, head_dim=s.head_dim, mlp_dim=s.mlp_dim)  # fmt: skip


def _pretrain(w: _World, config, params, style: str, steps: int, desc: str, seed: int):
    s = w.settings
    examples = data.encode_pairs(w.tok, _mixture(w, style, seed))
    optim = train.OptimConfig(learning_rate=s.pretrain_lr, warmup_steps=min(20, steps),
                              total_steps=steps)  # fmt: skip
    loop = loops.LoopConfig(steps=steps, batch_size=s.pretrain_batch, seed=seed,
                            progress=s.progress, desc=desc)  # fmt: skip
    return loops.run_sft(config, params, examples, optim, loop, pad_id=w.tok.pad_id)


def _cached_model(path: str, build: Callable[[], tuple[ModelConfig, dict, list]], log):
    if os.path.exists(os.path.join(path, "config.json")):
        log(f"reusing {path}")
        config, params = hf.load_hf(path)
        with open(os.path.join(path, "history.json")) as f:
            return config, params, json.load(f)
    config, params, history = build()
    hf.save_hf(path, config, params)
    with open(os.path.join(path, "history.json"), "w") as f:
        json.dump(history, f)
    return config, params, history


def base_and_teacher(w: _World, log=print):
    """(config, base params, teacher params, {name: history}), trained once per model_key."""
    s = w.settings
    root = os.path.join(s.workdir, "models", s.model_key())
    config = student_config(s)

    def build_base():
        r = _pretrain(w, config, models.init(config, seed=s.seed), s.base_style, s.base_steps,
                      "base (SFT, narrow slice)", s.seed)  # fmt: skip
        return config, r.state.params, r.history

    cfg, base, base_hist = _cached_model(os.path.join(root, "base"), build_base, log)

    def build_teacher():
        r = _pretrain(w, cfg, base, "all", s.teacher_steps, "teacher (SFT, all solutions)",
                      s.seed + 1)  # fmt: skip
        return cfg, r.state.params, r.history

    _, teacher, teacher_hist = _cached_model(os.path.join(root, "teacher"), build_teacher, log)
    return cfg, base, teacher, {"base": base_hist, "teacher": teacher_hist}


# ---------------------------------------------------------------------------------------------
# arms


def _reward(w: _World):
    def reward(i: int, completion: Sequence[int]) -> float:
        return float(w.cd.verify_answer(w.train[i], w.tok.decode(completion)))

    return reward


def run_arm(w: _World, arm: str, config, base, teacher) -> loops.RunResult:
    """Train one arm from the base with the shared budget; resumes from its checkpoints."""
    s = w.settings
    rows = s.prompts_per_step * s.group_size
    optim = train.OptimConfig(learning_rate=s.arm_lr, warmup_steps=min(5, s.arm_steps),
                              total_steps=s.arm_steps)  # fmt: skip
    loop = loops.LoopConfig(
        steps=s.arm_steps, batch_size=s.prompts_per_step, group_size=s.group_size,
        max_new_tokens=s.max_new_tokens, seed=s.seed + 100, progress=s.progress, desc=arm,
        workdir=os.path.join(s.workdir, "arms", arm), checkpoint_every=max(1, s.arm_steps // 3),
    )  # fmt: skip
    prompts = [w.tok.encode(w.cd.render_prompt(p), add_bos=True) for p in w.train]
    source = loops.PromptSource(prompts=prompts, reward=_reward(w), eos_id=w.tok.eos_id,
                                pad_id=w.tok.pad_id)  # fmt: skip
    if arm == "sft":
        pairs = countdown.sft_pairs(w.cd, w.train, style="all", per_problem=4, seed=s.seed + 7)
        sft_loop = dataclasses.replace(loop, batch_size=rows)
        return loops.run_sft(config, base, data.encode_pairs(w.tok, pairs), optim, sft_loop,
                             pad_id=w.tok.pad_id)  # fmt: skip
    if arm in ("grpo", "grpo_unlikely"):
        transform = None
        if arm == "grpo_unlikely":
            def transform(r, seq_logp):
                return np.asarray(losses.unlikeliness_rewards(
                    jnp.asarray(r), jnp.asarray(seq_logp), s.group_size, beta_rank=s.beta_rank))
        return loops.run_grpo(config, base, source, optim, loop, reward_transform=transform)
    if arm == "opsd":
        rng = np.random.default_rng([s.seed, 23])
        views = []
        for p in w.train:
            sols = w.cd.solutions(p)
            views.append(countdown.privileged_view(w.cd, p, sols[int(rng.integers(len(sols)))]))
        source = dataclasses.replace(source, teacher_prompts=[
            w.tok.encode(v.teacher_prompt, add_bos=True) for v in views])  # fmt: skip
        return loops.run_opd(config, base, config, base, source, losses.opd_kl(1.0), optim, loop)
    loss_fn = {
        "opd_fkl": lambda: losses.opd_kl(0.0),
        "opd_jsd": lambda: losses.opd_kl(0.5),
        "opd_rkl": lambda: losses.opd_kl(1.0),
        "opd_entropy": lambda: losses.entropy_aware_opd_kl(),
        "opd_prefix": lambda: losses.prefix_opd(losses.opd_kl(1.0), s.prefix_len),
    }[arm]()
    return loops.run_opd(config, base, config, teacher, source, loss_fn, optim, loop)


# ---------------------------------------------------------------------------------------------
# evaluation


@functools.cache
def _forced_logprobs_fn(config: ModelConfig):
    # One jitted function per config, so every model and arm reuses its compiled programs.
    return jax.jit(functools.partial(loops.teacher_forced_logprobs, config))


def _forced_logprobs(config, params, prompts, tokens, mask, pad_id, chunk=1024) -> np.ndarray:
    """Per-token logprobs [N, M] of fixed completions under a model (teacher forcing)."""
    fn = _forced_logprobs_fn(config)
    width = data.round_up(max(len(x) for x in prompts), 16)
    out = []
    for i in range(0, len(prompts), chunk):
        pt, pm = data.left_pad(prompts[i : i + chunk], width, pad_id)
        batch = {"prompt_tokens": pt, "prompt_mask": pm, "completion": tokens[i : i + chunk],
                 "completion_mask": mask[i : i + chunk]}  # fmt: skip
        out.append(np.asarray(fn(params, jax.tree.map(jnp.asarray, batch))))
    return np.concatenate(out) * mask


def _rows(samples: evaluate.Samples) -> list[list[int]]:
    return [p for p in samples.prompts for _ in range(samples.n)]


def _batch_nll(config, params, batch: dict, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token logprobs and mask of the targets of a training batch (SFT or prompt/completion)."""
    if "completion" in batch:
        prompts = [r[m.astype(bool)].tolist() for r, m in zip(batch["prompt_tokens"],
                                                              batch["prompt_mask"])]  # fmt: skip
        mask = np.asarray(batch["completion_mask"])
        return _forced_logprobs(config, params, prompts, np.asarray(batch["completion"]), mask,
                                pad_id), mask  # fmt: skip
    logits = models.apply(config, params, jnp.asarray(batch["tokens"]),
                          jnp.asarray(batch["attention_mask"]))  # fmt: skip
    logp = np.asarray(losses.token_logprobs(logits[:, :-1], jnp.asarray(batch["tokens"][:, 1:])))
    mask = np.asarray(batch["loss_mask"][:, 1:])
    return logp * mask, mask


@dataclasses.dataclass
class Evaluation:
    """One model's evaluation: JSON-able summary plus the per-problem values claims pair on."""

    curves: dict
    scalars: dict
    per_problem: dict
    samples: evaluate.Samples | None = None

    def to_json(self) -> dict:
        return {"curves": self.curves, "scalars": self.scalars, "per_problem": self.per_problem}


def _est(values) -> dict:
    return metrics.mean_ci(np.asarray(values, float)).as_dict()


def evaluate_model(w: _World, config, params, *, base: Evaluation | None = None,
                   base_params=None, seed: int = 0) -> Evaluation:  # fmt: skip
    """Every metric of the report for one model (the base's evaluation pairs with the others)."""
    s = w.settings
    cd_samples = evaluate.sample(config, params, w.tok, w.cd, w.test, n=s.eval_samples,
                                 max_new_tokens=s.max_new_tokens, seed=seed)  # fmt: skip
    summary = evaluate.summarize(cd_samples)
    n = s.eval_samples
    correct = cd_samples.answer_ok
    per_problem = {
        "pass@1": metrics.pass_at_k(n, correct.sum(1), 1).tolist(),
        "pass@large_k": metrics.pass_at_k(n, correct.sum(1), n).tolist(),
        "num_correct": correct.sum(1).tolist(),
        "diversity": [metrics.solution_entropy(row) for row in cd_samples.canonical],
    }
    scalars = dict(summary["scalars"])
    scalars["pass@large_k"] = scalars.pop(f"pass@{n}")
    scalars["diversity"] = _est(per_problem["diversity"])
    scalars["collision_rate"] = _est([metrics.collision_rate(r) for r in cd_samples.canonical])
    scalars["solution_set_coverage"] = _est(metrics.solution_set_coverage(
        cd_samples.canonical, [w.cd.solutions(p) for p in w.test]))  # fmt: skip

    add = evaluate.sample(config, params, w.tok, w.add, w.add_test, n=s.retention_samples,
                          max_new_tokens=40, seed=seed + 1)  # fmt: skip
    per_problem["retention"] = add.answer_ok.mean(1).tolist()
    scalars["retention"] = _est(per_problem["retention"])

    st = evaluate.sample(config, params, w.tok, w.steer, w.steer_test, n=s.steer_samples,
                         max_new_tokens=s.max_new_tokens, seed=seed + 2)  # fmt: skip
    comply = [[w.steer.complies(p, t) for t in row] for p, row in zip(w.steer_test, st.texts)]
    per_problem["steerability"] = np.mean(comply, axis=1).tolist()
    scalars["steerability"] = _est(per_problem["steerability"])
    scalars["steer_tv"] = _est([
        metrics.steer_distance([w.steer.compliant_canonical(p, t) for t in row],
                               w.steer.requested_distribution(p))["tv"]
        for p, row in zip(w.steer_test, st.texts)
    ])  # fmt: skip

    if base is not None and base_params is not None:
        scalars.update({f"support_{k}": {"mean": v} for k, v in metrics.support_change(
            np.asarray(base.per_problem["num_correct"]), correct.sum(1)).items()})  # fmt: skip
        # rank bias: base logprob of this model's correct samples against its change
        rows = _rows(cd_samples)
        base_lp = _forced_logprobs(config, base_params, rows, cd_samples.tokens, cd_samples.mask,
                                   w.tok.pad_id).sum(1)  # fmt: skip
        ok = correct.reshape(-1)
        groups = np.repeat(np.arange(len(w.test)), n)
        rb = metrics.rank_bias(base_lp[ok], cd_samples.seq_logprob.reshape(-1)[ok], groups[ok])
        scalars["rank_bias"] = {"mean": rb}
        # KL(base || model) on the base's own samples
        bs = base.samples
        lp = _forced_logprobs(config, params, _rows(bs), bs.tokens, bs.mask, w.tok.pad_id)
        scalars["kl_from_base"] = metrics.sequence_kl(bs.logprobs * bs.mask, lp, bs.mask).as_dict()
    return Evaluation(summary["curves"], scalars, per_problem, cd_samples)


def _paired(a, b) -> metrics.Estimate:
    """Mean of a - b over problems where both are defined, with a bootstrap CI."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return metrics.mean_ci(a[ok] - b[ok])


def _verdict(est: metrics.Estimate, expect_positive: bool = True) -> str:
    lo, hi = (est.lo, est.hi) if expect_positive else (-est.hi, -est.lo)
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced"
    return "inconclusive"


def _e(est: metrics.Estimate) -> str:
    return f"{est.mean:+.3f} [{est.lo:+.3f}, {est.hi:+.3f}]"


def claims(evals: dict[str, Evaluation]) -> list[dict]:
    """The literature's claims this setup can test, judged by paired 95% CIs over problems.

    "reproduced": the CI of the predicted difference excludes 0 in the predicted direction;
    "not reproduced": it excludes 0 in the other direction; otherwise "inconclusive".
    """
    out = []
    pp = {k: v.per_problem for k, v in evals.items()}
    if "grpo" in pp:
        gain1 = _paired(pp["grpo"]["pass@1"], pp["base"]["pass@1"])
        over = _paired(pp["base"]["pass@large_k"], pp["grpo"]["pass@large_k"])
        verdict = _verdict(over)
        if verdict == "reproduced" and gain1.lo <= 0:
            verdict = "inconclusive"  # a crossover needs GRPO ahead at k=1 first
        out.append({
            "claim": "RLVR (GRPO) beats the base at pass@1 but the base overtakes it at large k",
            "source": "Yue et al. 2025", "verdict": verdict,
            "evidence": f"pass@1 GRPO−base {_e(gain1)}; pass@large_k base−GRPO {_e(over)}",
        })  # fmt: skip
    if "grpo" in pp and "grpo_unlikely" in pp:
        d = _paired(pp["grpo_unlikely"]["pass@large_k"], pp["grpo"]["pass@large_k"])
        out.append({"claim": "the unlikeliness reward raises pass@large_k over GRPO",
                    "source": "He, Fried & Welleck 2025", "verdict": _verdict(d),
                    "evidence": f"pass@large_k unlikely−GRPO {_e(d)}"})  # fmt: skip
    on_policy = [a for a in ("grpo", "opd_rkl", "opd_jsd", "opd_fkl", "opsd") if a in pp]
    if "sft" in pp and on_policy:
        ret = np.mean([pp[a]["retention"] for a in on_policy], axis=0)
        d = _paired(ret, pp["sft"]["retention"])
        gains = ", ".join(
            f"{a} {_e(_paired(pp[a]['pass@1'], pp['base']['pass@1']))}" for a in ["sft", *on_policy]
        )
        out.append({"claim": "on-policy methods retain more of the earlier skill than SFT",
                    "source": "Shenfeld et al. 2025; Chen et al. 2025 (RL's razor / retention)",
                    "verdict": _verdict(d),
                    "evidence": f"addition accuracy, mean of {'/'.join(on_policy)} − SFT "
                                f"{_e(d)}; pass@1 gains: {gains}"})  # fmt: skip
    for arm, label in (("opd_rkl", "reverse-KL OPD"), ("opsd", "OPSD")):
        if arm in pp:
            d = _paired(pp[arm]["diversity"], pp["base"]["diversity"])
            out.append({"claim": f"{label} narrows diversity (solution entropy) below the base",
                        "source": "Agarwal et al. 2024 (GKD); mode-seeking reverse KL",
                        "verdict": _verdict(d, expect_positive=False),
                        "evidence": f"entropy {arm}−base {_e(d)} nats"})  # fmt: skip
    if "opd_entropy" in pp and "opd_rkl" in pp:
        d = _paired(pp["opd_entropy"]["diversity"], pp["opd_rkl"]["diversity"])
        out.append({"claim": "entropy-aware OPD keeps more diversity than reverse-KL OPD",
                    "source": "Jin et al. 2026", "verdict": _verdict(d),
                    "evidence": f"entropy entropy-aware−reverse-KL {_e(d)} nats"})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# the whole protocol


def _history(path: str) -> list[dict]:
    """An arm's training curve from its metrics.jsonl (a resumed run's replayed steps deduped)."""
    if not os.path.exists(os.path.join(path, "metrics.jsonl")):
        return []
    rows = {}
    for r in read_metrics(path):
        rows[r["step"]] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                           for k, v in r.items()}  # fmt: skip
    return [rows[k] for k in sorted(rows)]


def _load_eval(path: str, key: str) -> Evaluation | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("key") != key:
        return None
    return Evaluation(saved["curves"], saved["scalars"], saved["per_problem"])


def _save_eval(path: str, key: str, ev: Evaluation, extra: dict | None = None) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, **ev.to_json(), **(extra or {})}, f, default=float)
    os.replace(tmp, path)


def run(s: Settings, log: Callable[[str], None] = print) -> dict:
    """Run the protocol (reusing whatever an earlier run of the same settings left) and write
    the report; returns the metrics dictionary the report was rendered from."""
    start = time.perf_counter()
    os.makedirs(s.workdir, exist_ok=True)
    w = _world(s)
    config, base, teacher, pre_hist = base_and_teacher(w, log)
    log(f"models ready ({time.perf_counter() - start:.0f} s)")
    key = s.arm_key()
    evals: dict[str, Evaluation] = {}
    extras: dict[str, dict] = {}
    # the base is always evaluated in-process: other models' paired metrics need its samples
    log("evaluating base")
    evals["base"] = evaluate_model(w, config, base, seed=s.seed)
    log("evaluating teacher")
    evals["teacher"] = _load_eval(os.path.join(s.workdir, "models", "teacher_eval.json"), key)
    if evals["teacher"] is None:
        evals["teacher"] = evaluate_model(w, config, teacher, base=evals["base"],
                                          base_params=base, seed=s.seed)  # fmt: skip
        _save_eval(os.path.join(s.workdir, "models", "teacher_eval.json"), key, evals["teacher"])
    for arm in s.arms:
        arm_dir = os.path.join(s.workdir, "arms", arm)
        eval_path = os.path.join(arm_dir, "eval.json")
        cached = _load_eval(eval_path, key)
        if cached is not None:
            log(f"{arm}: reusing finished arm")
            evals[arm] = cached
            with open(eval_path) as f:
                extras[arm] = json.load(f)["extra"]
            continue
        t0 = time.perf_counter()
        result = run_arm(w, arm, config, base, teacher)
        if result.preempted:
            raise SystemExit(f"preempted during arm {arm}; rerun the same command to resume")
        train_s = time.perf_counter() - t0
        log(f"{arm}: trained in {train_s:.0f} s; evaluating")
        ev = evaluate_model(w, config, result.state.params, base=evals["base"], base_params=base,
                            seed=s.seed)  # fmt: skip
        history = _history(arm_dir)
        tokens = sum(h.get("sampled_tokens", h.get("num_tokens", 0.0)) or 0.0 for h in history)
        extra = {"tokens": tokens, "train_seconds": train_s}
        if result.last_batch is not None:
            lp, m = _batch_nll(config, result.state.params, result.last_batch, w.tok.pad_id)
            own = ev.samples
            extra["state_locality"] = metrics.state_locality(lp, m, own.logprobs * own.mask,
                                                              own.mask)  # fmt: skip
        _save_eval(eval_path, key, ev, {"extra": extra})
        evals[arm], extras[arm] = ev, extra
    metrics_dict = assemble(s, evals, extras, pre_hist)
    metrics_dict["settings"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    paths = report.write_report(s.workdir, metrics_dict)
    log(f"report: {paths['report']}")
    return metrics_dict


def assemble(s: Settings, evals: dict[str, Evaluation], extras: dict[str, dict],
             pre_hist: dict) -> dict:  # fmt: skip
    """The report's metrics dictionary from the evaluations (see `jaxpost.report`)."""
    base_p1 = evals["base"].scalars["pass@1"]["mean"]
    arms = {}
    for name, ev in evals.items():
        scalars = dict(ev.scalars)
        extra = extras.get(name, {})
        if name == "base":
            scalars["efficiency"] = {"mean": 0.0}  # no tokens spent, nothing gained
        if "tokens" in extra:
            gain = scalars["pass@1"]["mean"] - base_p1
            scalars["efficiency"] = {"mean": gain / max(extra["tokens"], 1.0) * 1e3}
            scalars["state_locality"] = {"mean": extra.get("state_locality", float("nan"))}
        arm_dir = os.path.join(s.workdir, "arms", name)
        arms[name] = {
            "kind": "reference" if name in ("base", "teacher") else "arm",
            "curves": ev.curves,
            "scalars": scalars,
            "history": _history(arm_dir) if name not in ("base", "teacher") else [],
        }
    settings = {
        "task": f"Countdown, 3 numbers in {list(s.number_range)}, targets in "
                f"{list(s.target_range)}, >= {s.min_solutions} solutions",
        "student": f"qwen2-style decoder d_model={s.d_model}, {s.n_layers} layers "
                   f"({student_config(s).num_params():,} parameters)",
        "base": f"SFT {s.base_steps} steps × {s.pretrain_batch} on Countdown slice "
                f"'{s.base_style}' + addition + steering + privileged-context examples",
        "teacher": f"the base trained {s.teacher_steps} more steps with all solutions",
        "budget per arm": f"{s.arm_steps} steps × {s.prompts_per_step} prompts × "
                          f"{s.group_size} samples, lr {s.arm_lr}",
        "evaluation": f"{s.eval_problems} held-out problems × {s.eval_samples} samples at "
                      f"temperature 1; retention: {s.retention_problems} addition problems × "
                      f"{s.retention_samples}; steering: {s.steer_problems} prompts × "
                      f"{s.steer_samples}",
        "arms": ", ".join(f"{a} ({ARM_HELP[a]})" for a in s.arms),
        "efficiency": "pass@1 gained over the base per 1k sampled (on-policy) or trained (SFT) "
                      "tokens",
        "seed": s.seed,
    }
    notes = [
        "pass@large_k is pass@k at k = the number of samples per problem; diversity is the "
        "entropy (nats) of the empirical distribution of distinct correct solutions per problem.",
        "state_locality: per-token NLL of the final policy on its last training batch minus on "
        "its own samples (≈0 for on-policy training).",
        "rank_bias: Spearman correlation, within each problem, between the base's sequence "
        "logprob of a correct sample and its change under the arm (He et al.).",
        "Pretraining curves (loss) of base/teacher: final loss "
        + ", ".join(f"{k} {v[-1]['loss']:.3f}" for k, v in pre_hist.items() if v),
    ]
    return {
        "arms": arms,
        "radar_axes": list(RADAR_AXES),
        "claims": claims(evals),
        "settings": settings,
        "notes": notes,
    }


__all__ = ["ARMS", "Evaluation", "Settings", "assemble", "base_and_teacher", "claims",
           "evaluate_model", "miniature", "run", "run_arm"]  # fmt: skip
