"""On-policy distillation (OPD) and self-distillation (OPSD) on Countdown; before/after metrics.

    python -m experiments.opd --config=experiments/configs/opd.py --workdir=/tmp/jaxpost_opd \\
        --teacher=/tmp/jaxpost_sft/model
    python -m experiments.opd --config=experiments/configs/opd.py --workdir=/tmp/jaxpost_opsd \\
        --config.mode=opsd --init=/tmp/jaxpost_opd/sft_init/model

The command, what it prints and the measured numbers are in experiments/configs/opd.py.
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from experiments import common, sft
from experiments.configs import opd as opd_config
from jaxpost import data, loops, losses
from jaxpost.tasks import countdown


def _check(config: ml_collections.ConfigDict) -> None:
    if config.mode not in ("opd", "opsd"):
        raise common.ExperimentError(f'mode must be "opd" or "opsd", got {config.mode!r}')
    if config.mode == "opsd" and config.teacher:
        raise common.ExperimentError("mode opsd distils from the frozen student; drop --teacher")
    if not 0.0 <= config.alpha <= 1.0:
        raise common.ExperimentError(f"alpha must lie in [0, 1] (0 forward KL, 1 reverse KL), "
                                     f"got {config.alpha}")  # fmt: skip
    if config.loss not in ("kl", "entropy_aware"):
        raise common.ExperimentError(f'loss must be "kl" or "entropy_aware", got {config.loss!r}')
    if config.prefix_len < 0 or not config.distill_temperature > 0:
        raise common.ExperimentError("prefix_len must be >= 0 and distill_temperature > 0")


def loss_function(config: ml_collections.ConfigDict):
    """The OPD loss the config names: opd_kl(alpha) or the entropy-aware mix, maybe prefixed."""
    if config.loss == "kl":
        fn = losses.opd_kl(float(config.alpha), temperature=config.distill_temperature,
                           impl=config.loss_impl or None)  # fmt: skip
    else:
        fn = losses.entropy_aware_opd_kl(temperature=config.distill_temperature)
    return losses.prefix_opd(fn, config.prefix_len) if config.prefix_len > 0 else fn


def _teacher(config, task, student: common.Model, workdir: str) -> common.Model:
    path = config.teacher
    if path and not os.path.isdir(path):
        raise common.ExperimentError(f"--teacher directory not found: {path}")
    if not path:
        path = sft.build_init(config.teacher_sft, task, os.path.join(workdir, "teacher"),
                              seed=config.seed, what="teacher")  # fmt: skip
    teacher = common.load_model(path, tokenizer=config.tokenizer, dtype=config.dtype)
    sample = task.render_prompt(task.prompts("test", 1, 0)[0])
    if (teacher.config.vocab_size != student.config.vocab_size
            or not common.same_tokenizer(teacher.tokenizer, student.tokenizer, sample)):  # fmt: skip
        raise common.ExperimentError(
            f"teacher ({path}, vocab {teacher.config.vocab_size}) and student "
            f"({student.source}, vocab {student.config.vocab_size}) must share one tokenizer "
            f"and vocabulary for token-level distillation"
        )
    return teacher


def _privileged(task: countdown.Countdown, problem, rng: np.random.Generator) -> str:
    solutions = task.solutions(problem)
    return countdown.privileged_view(task, problem, solutions[int(rng.integers(len(solutions)))]
                                     ).teacher_prompt  # fmt: skip


def run(config: ml_collections.ConfigDict) -> dict:
    """OPD / OPSD with before/after evaluation; returns {"results", "wall_s", "model_dir"}."""
    start = time.perf_counter()
    _check(config)
    workdir = common.require_workdir(config)
    task = common.countdown_task(config.task)
    student = sft.starting_model(config, task, workdir, what="sft_init")
    tok, L = student.tokenizer, config.loop
    train = common.problems(task, "train", config.train_problems, config.seed)
    prompts = common.encode_prompts(tok, [task.render_prompt(p) for p in train])
    common.check_lengths(student.config, prompts, L.max_new_tokens, "OPD rollouts")
    if config.mode == "opd":
        teacher = _teacher(config, task, student, workdir)
        teacher_prompts = None
        check_teacher = prompts
        render = None
    else:
        teacher = common.Model(student.config, student.params, tok, "the frozen starting student")
        rng = np.random.default_rng([config.seed, 13])
        teacher_prompts = common.encode_prompts(tok, [_privileged(task, p, rng) for p in train])
        check_teacher = teacher_prompts

        def render(p):
            return countdown.privileged_view(task, p, task.solutions(p)[0]).teacher_prompt

    common.check_lengths(teacher.config, check_teacher, L.max_new_tokens, "the teacher's prompts")
    print(f"student: {student.describe()}\nteacher: {teacher.describe()}"
          f"{' with the reference solution in its prompt' if config.mode == 'opsd' else ''}",
          flush=True)  # fmt: skip
    rows = L.batch_size * L.group_size
    seq_len = data.round_up(max(map(len, check_teacher)), 16) + L.max_new_tokens
    common.check_memory(student.config, batch=rows, seq_len=seq_len,
                        grad_accum=config.optim.grad_accum, teacher_config=teacher.config,
                        sample_batch=rows, max_new_tokens=L.max_new_tokens,
                        fused_kernel=bool(config.loss_impl))  # fmt: skip

    def reward(i: int, completion: list[int]) -> float:  # logged as the rollout pass rate
        return float(task.verify_answer(train[i], tok.decode(completion)))

    source = loops.PromptSource(prompts, reward=reward, teacher_prompts=teacher_prompts,
                                eos_id=tok.eos_id, pad_id=tok.pad_id)  # fmt: skip
    sets = common.eval_sets(config, task)
    results = {"start": common.evaluate_model("start", student.config, student.params, tok, sets,
                                              config.eval)}  # fmt: skip
    if config.eval.teacher:
        label = "teacher (privileged)" if config.mode == "opsd" else "teacher"
        countdown_only = {k: v for k, v in sets.items() if k == "countdown"}
        results[label] = common.evaluate_model(
            label, teacher.config, teacher.params, tok, countdown_only, config.eval,
            render={"countdown": render} if render else None,
        )  # fmt: skip

    print(f"{config.mode}: {L.steps} steps of {L.batch_size} prompts x {L.group_size} samples, "
          f"alpha {config.alpha:g}, loss {config.loss!r}, lr {config.optim.learning_rate:g}",
          flush=True)  # fmt: skip
    train_start = time.perf_counter()
    result = loops.run_opd(
        student.config, student.params, teacher.config, teacher.params, source,
        loss_function(config), common.optim_config(config.optim, L.steps),
        common.loop_config(L, seed=config.seed, workdir=workdir, desc=config.mode,
                           group_size=L.group_size, max_new_tokens=L.max_new_tokens,
                           temperature=L.temperature),
    )  # fmt: skip
    if result.preempted:
        print(f"{config.mode}: preempted; rerun the same command to resume", flush=True)
        return {"preempted": True}
    if result.history:
        h = result.history
        first, last = h[: min(10, len(h))], h[-min(10, len(h)) :]
        print(f"{config.mode}: loss {np.mean([r['loss'] for r in first]):.4g} (first 10 steps) -> "
              f"{np.mean([r['loss'] for r in last]):.4g} (last 10); rollout pass rate "
              f"{np.mean([r['pass_rate'] for r in first]):.3f} -> "
              f"{np.mean([r['pass_rate'] for r in last]):.3f} "
              f"({time.perf_counter() - train_start:.0f} s)", flush=True)  # fmt: skip
    params = result.state.params
    label = f"after {config.mode.upper()}"
    results[label] = common.evaluate_model(label, student.config, params, tok, sets, config.eval)
    model_dir = common.save_model(os.path.join(workdir, "model"), student, params)
    return common.report(workdir, results, config.eval, start, model_dir)


# Plain flags -> the config field each sets.
PLAIN_FLAGS = {"workdir": "workdir", "init": "init", "model": "init", "teacher": "teacher"}

if __name__ == "__main__":
    common.run_main(run, opd_config.get_config, "experiments.opd", PLAIN_FLAGS)
