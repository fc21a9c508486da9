"""What the single-paradigm recipes share: the workdir, typed settings from the config, the
memory plan, the built-in SFT stage, evaluation and the report.

Everything here reads an experiment ConfigDict (experiments/configs/*) and turns bad settings into
`UserError`s; the arithmetic and the loops live in the library modules it calls.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from jaxpost import data, distributed, evaluate, inputs, loops, lora, train
from jaxpost.errors import Preempted, UserError
from jaxpost.inputs import Model
from jaxpost.rollouts import SamplingConfig
from jaxpost.workdir import prepare as prepare_workdir

RUN_CONFIG = "run_config.json"
# Settings a rerun may change without changing what is trained: where and how often it reports,
# and the evaluation (run again on the resumed model).
_RESUMABLE_CHANGES = ("workdir", "eval", "checkpoint_every", "log_every", "progress",
                      "max_skipped_streak", "max_skipped_share", "loss_explode",
                      "max_param_growth")
# What the recipes write into a workdir once training starts (other files, a log the user tees
# there, say, do not make it a started run).
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "model", "sft_init", "teacher", "eval.json")


def log(message: str) -> None:
    """Print from process 0 only (every process runs the same program)."""
    if distributed.is_writer():
        print(message, flush=True)


def require_workdir(config) -> str:
    """Create the workdir (the recipe's `run` holds its lock: `jaxpost.workdir.holding`) and
    check that the run it holds was started with these settings.

    The first run writes WORKDIR/run_config.json; once training has written its outputs there
    (`_RUN_OUTPUTS`), a rerun resumes only if the settings that shape training are unchanged,
    and otherwise stops with the fields that differ (resuming a checkpoint under other settings
    would silently mix two runs). A started workdir without the file (from before it existed)
    is used as it is.
    """
    prepare_workdir(config.workdir)  # its lock is held by the recipe's run (`workdir.holding`)
    now = _training_settings(config.to_dict())
    path = os.path.join(config.workdir, RUN_CONFIG)
    started = any(os.path.exists(os.path.join(config.workdir, name)) for name in _RUN_OUTPUTS)
    if started and os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        unset = "(unset)"
        changed = sorted(k for k in before.keys() | now.keys()
                         if before.get(k, unset) != now.get(k, unset))  # fmt: skip
        if changed:
            shown = "; ".join(f"{k}: {before.get(k, unset)!r} -> {now.get(k, unset)!r}"
                              for k in changed[:6])  # fmt: skip
            raise UserError(
                f"{config.workdir} holds a run started with other settings ({shown}"
                f"{'; ...' if len(changed) > 6 else ''}); rerun with the same flags to resume "
                f"it, or pass a new --workdir"
            )
    elif not started and distributed.is_writer():  # a run that stopped before training may
        with open(path, "w") as f:  # change its flags
            json.dump(now, f, indent=1, sort_keys=True)
    return config.workdir


def _training_settings(tree: dict, prefix: str = "") -> dict:
    """The config flattened to dotted keys (JSON values), without `_RESUMABLE_CHANGES`."""
    out = {}
    for key, value in tree.items():
        if key in _RESUMABLE_CHANGES:
            continue
        if isinstance(value, dict):
            out |= _training_settings(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


# ---------------------------------------------------------------------------------------------
# typed settings


def _typed(kind: str, build: Callable):
    try:
        return build()
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {kind} settings: {e}") from None


def optim_config(c, total_steps: int) -> train.OptimConfig:
    return _typed("optimizer", lambda: train.OptimConfig(
        learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, total_steps=total_steps,
        end_lr_ratio=c.end_lr_ratio, weight_decay=c.weight_decay,
        clip_norm=c.clip_norm if c.clip_norm > 0 else None, grad_accum=c.grad_accum))  # fmt: skip


def loop_config(c, *, seed: int, workdir: str | None, desc: str) -> loops.LoopConfig:
    return _typed("loop", lambda: loops.LoopConfig(
        steps=c.steps, batch_size=c.batch_size, seed=seed, workdir=workdir,
        checkpoint_every=c.checkpoint_every, log_every=c.log_every, progress=c.progress,
        desc=desc, max_skipped_streak=c.max_skipped_streak, max_skipped_share=c.max_skipped_share,
        loss_explode=c.loss_explode, max_param_growth=c.max_param_growth))  # fmt: skip


def lora_config(config) -> lora.LoraConfig | None:
    """The config's `lora_rank` / `lora_alpha` as a `lora.LoraConfig` (None at rank 0)."""
    return _typed("lora", lambda: lora.from_rank(config.lora_rank, config.lora_alpha))


def sampling_config(c) -> SamplingConfig:
    return _typed("sampling", lambda: SamplingConfig(
        group_size=c.group_size, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
        top_k=c.top_k or None, top_p=c.top_p if c.top_p < 1 else None))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# devices and memory


def describe_devices(mesh) -> None:
    log(distributed.describe(mesh))


# ---------------------------------------------------------------------------------------------
# the SFT stage (sft.py's training; grpo/opd's built-in student and teacher)


def sft_examples(stage, task, model: Model, *, seed: int, mesh, desc: str = "sft",
                 loss_impl: str = "auto", sample_batch: int | None = None,
                 lora_rank: int = 0) -> list:  # fmt: skip
    """The SFT stage's token pairs (the `stage.data` mixture of the task's reference solutions),
    with the memory plan of its step checked (plus a sampler of `sample_batch` rows, for the
    evaluation that shares the run)."""
    d = stage.data
    train_problems = inputs.problems(task, "train", d.train_problems, seed)
    retention = None
    if d.retention_share > 0:
        from jaxpost.tasks import addition

        retention = addition.Addition()
    pairs = inputs.sft_mixture(
        task, train_problems, style=d.style, per_problem=d.per_problem, seed=seed,
        retention=retention, retention_share=d.retention_share,
        steering_share=d.steering_share, privileged_share=d.privileged_share,
    )  # fmt: skip
    examples = inputs.encode_examples(model, pairs, f"{desc} data")
    inputs.check_memory(model.config, mesh, objective="sft", loss_impl=loss_impl,
                        batch=stage.loop.batch_size, seq_len=data.pair_width(examples),
                        grad_accum=stage.optim.grad_accum, sample_batch=sample_batch,
                        lora_rank=lora_rank)  # fmt: skip
    log(f"{desc}: {len(examples)} examples ({len(train_problems)} {task.name} problems x "
        f"{d.per_problem}, style {d.style!r}), {stage.loop.steps} steps of "
        f"{stage.loop.batch_size}")  # fmt: skip
    return examples


def train_sft(stage, model: Model, examples: list, *, workdir: str | None, seed: int, mesh,
              desc: str = "sft", loss_impl: str = "auto",
              lora: lora.LoraConfig | None = None) -> loops.RunResult:  # fmt: skip
    """SFT `model` on `examples` (`sft_examples`) with the stage's optimizer and loop (low-rank
    adapters with `lora`)."""
    start = time.perf_counter()
    result = loops.run_sft(
        model.config, model.params, examples, optim_config(stage.optim, stage.loop.steps),
        loop_config(stage.loop, seed=seed, workdir=workdir, desc=desc),
        pad_id=model.tokenizer.pad_id, mesh=mesh, loss_impl=loss_impl, lora=lora,
    )  # fmt: skip
    if result.history:
        last = result.history[-1]
        log(f"{desc}: step {last['step']} loss {last['loss']:.4f} "
            f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return result


def stop_if_preempted(result: loops.RunResult, what: str) -> None:
    """Raise `Preempted` (the main exits 143) when the loop stopped on SIGTERM: its checkpoint is
    saved, and rerunning the command resumes from it."""
    if result.preempted:
        step = result.history[-1]["step"] if result.history else "its start"
        raise Preempted(f"{what}: preempted (SIGTERM) after step {step}; the checkpoint is "
                        f"saved; rerun the same command to resume")  # fmt: skip


def built_in(stage, task, start: Model, workdir: str, *, seed: int, mesh, what: str,
             loss_impl: str = "auto") -> Model:  # fmt: skip
    """An SFT-trained model at `workdir/model`: trained here from `start` unless it already is
    (a rerun reuses it; an interrupted stage resumes from `workdir/checkpoints`)."""
    path = os.path.join(workdir, "model")

    def build():
        log(f"{what}: SFT of {start.describe()} into {path}")
        examples = sft_examples(stage, task, start, seed=seed, mesh=mesh, desc=what,
                                loss_impl=loss_impl)  # fmt: skip
        result = train_sft(stage, start, examples, workdir=workdir, seed=seed, mesh=mesh,
                           desc=what, loss_impl=loss_impl)  # fmt: skip
        stop_if_preempted(result, what)
        return result.params, result.history

    if os.path.isfile(os.path.join(path, "config.json")):
        log(f"{what}: reusing {path}")
    model, _ = inputs.reuse_or_train(path, start, build)
    return model.on(mesh)


def student(config, task, mesh) -> Model:
    """grpo/opd's student: `config.model` as it is when it is a checkpoint directory; a preset is
    first SFT-trained with `config.sft` into WORKDIR/sft_init."""
    model = load(config, config.model)
    if config.model not in _presets():
        return model.on(mesh)
    return built_in(config.sft, task, model, os.path.join(config.workdir, "sft_init"),
                    seed=config.seed, mesh=mesh, what="sft_init", loss_impl=config.loss_impl)  # fmt: skip


def load(config, spec: str, *, student: bool = True) -> Model:
    """The student (`config.model`, with the preset overrides) or another model of the run (a
    teacher: `student=False`), with the config's tokenizer and dtype."""
    if not spec:
        raise UserError("no model given: pass --model=DIR (a Hugging Face checkpoint) or a preset "
                        "name; the 'pretrained' config variants need one")  # fmt: skip
    return inputs.load_model(spec, tokenizer=config.tokenizer, dtype=config.dtype,
                             overrides=config.model_overrides if student else "",
                             seed=config.init_seed, remat=config.remat if student else "")  # fmt: skip


def _presets():
    from jaxpost import models

    return models.PRESETS


# ---------------------------------------------------------------------------------------------
# evaluation and the report


def eval_sets(config, task) -> dict[str, tuple]:
    """{task name: (task, held-out problems)}: the task, and addition when asked for."""
    e = config.eval
    sets = {}
    if e.prompts > 0:
        sets[task.name] = (task, inputs.problems(task, "test", e.prompts, e.seed))
    if e.addition_prompts > 0:
        from jaxpost.tasks import addition

        add = addition.Addition()
        sets["addition"] = (add, inputs.problems(add, "test", e.addition_prompts, e.seed))
    return sets


def eval_rows(sets: dict, e, mesh) -> int:
    """The most rows `evaluate_sets` samples at once (a memory plan's `sample_batch`; 0 when
    there is no evaluation)."""
    return max((evaluate.chunk_rows(len(p), e.samples, mesh) for _, p in sets.values()), default=0)


def evaluate_sets(label: str, model: Model, params, sets: dict, e, *, mesh,
                   render: dict | None = None) -> dict:  # fmt: skip
    """{task name: evaluate.summarize(...)} of one model; `render` maps a task name to a prompt
    renderer (e.g. OPSD's privileged view)."""
    out = {}
    start = time.perf_counter()
    for name, (task, probs) in sets.items():
        fn = (render or {}).get(name) or task.render_prompt
        inputs.encode_prompts(model, [fn(p) for p in probs], max_new_tokens=e.max_new_tokens,
                              what=f"evaluation on {name}")  # fmt: skip
        samples = evaluate.sample(
            model.config, params, model.tokenizer, task, probs, n=e.samples,
            max_new_tokens=e.max_new_tokens, temperature=e.temperature, seed=e.seed,
            render=fn, mesh=mesh,
        )  # fmt: skip
        out[name] = evaluate.summarize(samples, seed=e.seed)
    if sets:
        log(f"eval {label}: " + ", ".join(f"{name} {len(p)} problems x {e.samples}"
                                          for name, (_, p) in sets.items())
            + f" in {time.perf_counter() - start:.0f} s")  # fmt: skip
    return out


def _ci(x: dict) -> str:
    return f"{x['mean']:.3f} [{x['lo']:.3f},{x['hi']:.3f}]"


def format_table(results: dict[str, dict], n: int) -> str:
    """One line per (model, task): pass@1 and pass@n with 95% CIs, CoT-pass@1, coverage and the
    mean number of distinct correct solutions per problem."""
    head = (f"{'model':<26}{'task':<11}{'pass@1':<22}{f'pass@{n}':<22}{'cot_pass@1':>11}"
            f"{'coverage':>10}{'distinct':>10}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for label, per_task in results.items():
        for name, summary in per_task.items():
            s = summary["scalars"]
            lines.append(
                f"{label:<26}{name:<11}{_ci(s['pass@1']):<22}{_ci(s[f'pass@{n}']):<22}"
                f"{s['cot_pass@1']['mean']:>11.3f}{s['coverage']['mean']:>10.3f}"
                f"{s['distinct_correct']['mean']:>10.2f}"
            )
    return "\n".join(lines)


def report(workdir: str, results: dict[str, dict], e, start: float, model_dir: str) -> dict:
    """Print the evaluation table and the wall time; write WORKDIR/eval.json (process 0)."""
    wall = time.perf_counter() - start
    path = os.path.join(workdir, "eval.json")
    if distributed.is_writer():
        if results and any(results.values()):
            print(format_table(results, e.samples))
        with open(path, "w") as f:
            json.dump({"results": results, "wall_s": wall}, f, default=float)
    log(f"wall time {wall:.0f} s; model saved to {model_dir}; evaluation in {path}")
    return {"results": results, "wall_s": wall, "model_dir": model_dir}

