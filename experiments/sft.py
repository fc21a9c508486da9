"""SFT on Countdown solutions (optionally mixed with addition), evaluated before and after.

    python -m experiments.sft --config=experiments/configs/sft.py --workdir=/tmp/jaxpost_sft

The command, what it prints and the measured numbers are in experiments/configs/sft.py. The SFT
stage here is also the built-in starting point of grpo.py and opd.py (`build_init`).
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from experiments import common
from experiments.configs import sft as sft_config
from jaxpost import data, loops
from jaxpost.tasks import addition, countdown


def sft_pairs(stage: ml_collections.ConfigDict, task: countdown.Countdown,
              seed: int) -> tuple[list[tuple[str, str]], int]:  # fmt: skip
    """(prompt, completion) texts of an SFT stage and the number of Countdown problems.

    A `privileged_fraction` of the Countdown examples show the solution they complete in the
    prompt (countdown.privileged_view): a model trained so can read a reference, which is what
    makes the frozen initial student a useful OPSD teacher.
    """
    d = stage.data
    train = common.problems(task, "train", d.train_problems, seed)
    try:
        pairs = countdown.sft_pairs(
            task, train, style=d.style, per_problem=d.per_problem, seed=seed
        )
    except ValueError as e:
        raise common.ExperimentError(f"bad data config: {e}") from None
    if not pairs:
        raise common.ExperimentError(f"the slice {d.style!r} leaves no training examples")
    if d.privileged_fraction > 0:
        by_prompt = {task.render_prompt(p): p for p in train}
        rng = np.random.default_rng([seed, 11])
        for i, (prompt, completion) in enumerate(pairs):
            if rng.random() < d.privileged_fraction:
                problem = by_prompt[prompt]
                view = countdown.privileged_view(task, problem, task.canonical(problem, completion))
                pairs[i] = (view.teacher_prompt, completion)
    if d.addition_problems > 0:
        add = addition.Addition(digits=tuple(d.addition_digits))
        for p in common.problems(add, "train", d.addition_problems, seed):
            pairs.append((add.render_prompt(p), add.render_completion(p, add.solutions(p)[0])))
    return pairs, len(train)


def train_sft(stage: ml_collections.ConfigDict, task: countdown.Countdown, model: common.Model, *,
              workdir: str, seed: int, desc: str = "sft") -> loops.RunResult:  # fmt: skip
    """Run the SFT stage on `model`; checkpoints and metrics.jsonl go to `workdir`."""
    pairs, n_problems = sft_pairs(stage, task, seed)
    try:
        examples = data.encode_pairs(model.tokenizer, pairs)
    except ValueError as e:
        raise common.ExperimentError(f"the tokenizer cannot encode the task's text: {e}") from None
    width = data.round_up(max(len(p) + len(c) for p, c in examples), 16)
    if width > model.config.max_seq_len:
        raise common.ExperimentError(f"the longest SFT example ({width} tokens, padded) exceeds "
                                     f"the model's max_seq_len {model.config.max_seq_len}")  # fmt: skip
    common.check_memory(model.config, batch=stage.loop.batch_size, seq_len=width,
                        grad_accum=stage.optim.grad_accum)  # fmt: skip
    print(f"{desc}: {len(examples)} examples ({n_problems} Countdown problems x "
          f"{stage.data.per_problem}, style {stage.data.style!r}, "
          f"{stage.data.addition_problems} addition), {stage.loop.steps} steps of "
          f"{stage.loop.batch_size}", flush=True)  # fmt: skip
    optim = common.optim_config(stage.optim, stage.loop.steps)
    loop = common.loop_config(stage.loop, seed=seed, workdir=workdir, desc=desc)
    start = time.perf_counter()
    result = loops.run_sft(model.config, model.params, examples, optim, loop,
                           pad_id=model.tokenizer.pad_id)  # fmt: skip
    if result.history:
        last = result.history[-1]
        print(f"{desc}: step {last['step']} loss {last['loss']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    return result


def build_init(stage: ml_collections.ConfigDict, task: countdown.Countdown, workdir: str, *,
               seed: int, what: str) -> str:  # fmt: skip
    """The Hugging Face directory of an SFT-trained model, trained here unless it already is.

    `workdir/model` is reused when present (a rerun of grpo/opd skips its built-in SFT); a run
    that stopped midway resumes from `workdir/checkpoints`.
    """
    path = os.path.join(workdir, "model")
    if os.path.exists(os.path.join(path, "config.json")):
        print(f"{what}: reusing {path}", flush=True)
        return path
    model = common.load_model(stage.model, tokenizer=stage.tokenizer, dtype=stage.dtype,
                              overrides=stage.model_overrides, seed=stage.init_seed)  # fmt: skip
    print(f"{what}: SFT of {model.describe()} into {path}", flush=True)
    result = train_sft(stage, task, model, workdir=workdir, seed=seed, desc=what)
    if result.preempted:
        raise SystemExit(f"{what}: preempted; rerun the same command to resume")
    return common.save_model(path, model, result.state.params)


def starting_model(config: ml_collections.ConfigDict, task: countdown.Countdown, workdir: str, *,
                   what: str = "init") -> common.Model:  # fmt: skip
    """grpo/opd's student: `config.init` if set (it must exist), else `build_init(config.sft)`
    into WORKDIR/sft_init."""
    path = config.init
    if path:
        if not os.path.isdir(path):
            raise common.ExperimentError(
                f"--init directory not found: {path} (run experiments.sft first, which writes "
                f"WORKDIR/model, or leave --init unset to train a starting model here)"
            )
    else:
        path = build_init(config.sft, task, os.path.join(workdir, "sft_init"), seed=config.seed,
                          what=what)  # fmt: skip
    return common.load_model(path, tokenizer=config.tokenizer, dtype=config.dtype)


def run(config: ml_collections.ConfigDict) -> dict:
    """SFT with before/after evaluation; returns {"results", "wall_s", "model_dir"}."""
    start = time.perf_counter()
    workdir = common.require_workdir(config)
    task = common.countdown_task(config.task)
    model = common.load_model(config.model, tokenizer=config.tokenizer, dtype=config.dtype,
                              overrides=config.model_overrides, seed=config.init_seed)  # fmt: skip
    sets = common.eval_sets(config, task)
    print(f"model: {model.describe()}", flush=True)
    tok = model.tokenizer
    results = {"before": common.evaluate_model("before", model.config, model.params, tok, sets,
                                               config.eval)}  # fmt: skip
    result = train_sft(config, task, model, workdir=workdir, seed=config.seed)
    if result.preempted:
        print("sft: preempted; rerun the same command to resume", flush=True)
        return {"preempted": True}
    params = result.state.params
    results["after SFT"] = common.evaluate_model("after SFT", model.config, params, tok, sets,
                                                 config.eval)  # fmt: skip
    model_dir = common.save_model(os.path.join(workdir, "model"), model, params)
    return common.report(workdir, results, config.eval, start, model_dir)


# Plain flags -> the config field each sets.
PLAIN_FLAGS = {"workdir": "workdir", "model": "model"}

if __name__ == "__main__":
    common.run_main(run, sft_config.get_config, "experiments.sft", PLAIN_FLAGS)
