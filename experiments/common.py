"""Plumbing the experiment mains share: flags, models and tokenizers, the task, evaluation, saving.

A main is a `run(config) -> dict` function (the tests call it directly with a ConfigDict) and

    if __name__ == "__main__":
        common.run_main(run, default_config, "experiments.<name>", {"workdir": "workdir", ...})

which defines the flags only when the module runs as a program, so importing several mains (or a
main beside another absl program) never defines a flag twice:

    --config=experiments/configs/<main>.py   the ConfigDict; --config.a.b=value overrides a field
    --workdir=DIR                            overrides config.workdir
    --model=DIR                              a local Hugging Face checkpoint instead of a preset
    --init=DIR, --teacher=DIR                grpo/opd: the starting student and the OPD teacher

Errors a user can fix (a missing directory, a preset that does not exist, a tokenizer larger than
the model's vocabulary, prompts longer than the model accepts, a plan that does not fit in device
memory) are `ExperimentError`s, `hf.CheckpointError`s or `MemoryError`s: the main prints the
message on one line and exits with status 1, without a traceback.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_GCE_CHECK", "true")

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxpost import data, evaluate, loops, models, plan, tokenizers, train  # noqa: E402
from jaxpost.models import ModelConfig, hf  # noqa: E402
from jaxpost.tasks import addition, countdown  # noqa: E402
from jaxpost.tokenizers import CharTokenizer, HFTokenizer, Tokenizer  # noqa: E402

TOKENIZER_MARKER = tokenizers.TOKENIZER_MARKER

_FLAG_HELP = {
    "workdir": "run directory (overrides config.workdir)",
    "model": "a local Hugging Face checkpoint directory to start from instead of the default",
    "init": "the starting student, a Hugging Face directory (e.g. WORKDIR/model of experiments.sft)",
    "teacher": "the OPD teacher, a Hugging Face directory",
}


class ExperimentError(ValueError):
    """A problem with the flags or the inputs they name, reported without a traceback."""


# ---------------------------------------------------------------------------------------------
# flags -> config -> run


def define_flags(plain: dict[str, str], *, flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: list[str] | None = None) -> dict[str, flags.FlagHolder]:  # fmt: skip
    """Define --config and the plain string flags of one main.

    Args:
      plain: flag name -> the config field it sets, e.g. {"workdir": "workdir", "model": "init"}.
      flag_values, sys_argv: where to define them and the argv config_flags reads its
        --config.* overrides from (defaults: absl's global FLAGS and sys.argv).
    """
    holders = {
        "config": config_flags.DEFINE_config_file(
            "config",
            None,
            "experiment config (experiments/configs/*.py); --config.a.b=v overrides one field",
            flag_values=flag_values,
            sys_argv=sys_argv,
        )  # fmt: skip
    }
    for name in plain:
        holders[name] = flags.DEFINE_string(name, None, _FLAG_HELP[name], flag_values=flag_values)
    return holders


def config_from_flags(holders: dict[str, flags.FlagHolder],
                      default_config: Callable[[], ml_collections.ConfigDict],
                      plain: dict[str, str]) -> ml_collections.ConfigDict:  # fmt: skip
    """The --config file (or `default_config()` without one) with the plain flags applied."""
    config = holders["config"].value
    config = ml_collections.ConfigDict((config or default_config()).to_dict())  # unlocked copy
    for name, field in plain.items():
        if holders[name].value is not None:
            config[field] = holders[name].value
    return config


def run_main(run: Callable[[ml_collections.ConfigDict], dict],
             default_config: Callable[[], ml_collections.ConfigDict], name: str,
             plain: dict[str, str]) -> None:  # fmt: skip
    """Define the flags and `app.run` the main: config from flags, `run(config)`, and user
    errors as one line on stderr with exit status 1."""
    holders = define_flags(plain)

    def main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
        try:
            run(config_from_flags(holders, default_config, plain))
        except (ExperimentError, hf.CheckpointError, MemoryError) as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(main)


RUN_CONFIG = "run_config.json"
# Settings a rerun may change without changing what is trained: where and how often it reports,
# and the evaluation (run again on the resumed model).
_RESUMABLE_CHANGES = ("workdir", "eval", "checkpoint_every", "log_every", "progress")
# What the mains write into a workdir once training starts (other files, a log the user tees
# there, say, do not make it a started run).
_RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "model", "sft_init", "teacher", "eval.json")


def require_workdir(config: ml_collections.ConfigDict) -> str:
    """Create the workdir, or check that the run it holds was started with these settings.

    The first run writes WORKDIR/run_config.json; once training has written its outputs there
    (`_RUN_OUTPUTS`), a rerun resumes only if the settings that shape training are unchanged,
    and otherwise stops with the fields that differ (resuming a checkpoint under other settings
    would silently mix two runs). A started workdir without the file (from before it existed)
    is used as it is.
    """
    if not config.workdir:
        raise ExperimentError("a workdir is needed (--workdir=DIR): the model is saved there")
    os.makedirs(config.workdir, exist_ok=True)
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
            raise ExperimentError(
                f"{config.workdir} holds a run started with other settings ({shown}"
                f"{'; ...' if len(changed) > 6 else ''}); rerun with the same flags to resume "
                f"it, or pass a new --workdir"
            )
    elif not started:  # a run that stopped before training may change its flags
        with open(path, "w") as f:
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
# models and tokenizers


@dataclasses.dataclass
class Model:
    """A model to train or evaluate: its config, parameters, tokenizer and where it came from."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    source: str

    def describe(self) -> str:
        c = self.config
        return (f"{self.source} ({c.num_params() / 1e6:.2f}M parameters, {c.family}, "
                f"d_model {c.d_model}, {c.n_layers} layers, vocab {c.vocab_size})")  # fmt: skip


def parse_overrides(text: str) -> dict[str, Any]:
    """ "d_model=96,n_layers=3" -> {"d_model": 96, "n_layers": 3}, typed like ModelConfig."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields or key in ("vocab_size", "rope_scaling"):
            settable = sorted(set(fields) - {"vocab_size", "rope_scaling"})
            raise ExperimentError(f"bad model override {item!r}: expected FIELD=VALUE with FIELD "
                                  f"one of {settable} (vocab_size follows the tokenizer)")  # fmt: skip
        default = fields[key].default
        try:
            if isinstance(default, bool):
                out[key] = {"true": True, "false": False}[value.strip().lower()]
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            elif default is None:  # the optional special-token ids
                out[key] = int(value)
            else:
                out[key] = value.strip() or None
        except (KeyError, ValueError):
            raise ExperimentError(f"bad value in model override {item!r}") from None
    return out


def load_tokenizer(spec: str, model_dir: str | None) -> Tokenizer:
    """ "char", a tokenizer directory, or "auto": the model directory's own tokenizer (its
    Hugging Face files, or the character tokenizer when jaxpost's marker says so)."""
    if spec == "char":
        return CharTokenizer()
    if spec != "auto":
        if not os.path.isdir(spec):
            raise ExperimentError(f"tokenizer directory not found: {spec}")
        return HFTokenizer.from_dir(spec)
    if model_dir is None:
        return CharTokenizer()
    try:
        return tokenizers.from_model_dir(model_dir)
    except ValueError as e:
        raise ExperimentError(
            f"{e}; pass --config.tokenizer=char or --config.tokenizer=DIR"
        ) from None


def load_model(spec: str, *, tokenizer: str = "auto", overrides: str = "", dtype: str = "",
               seed: int = 0) -> Model:  # fmt: skip
    """A preset name (randomly initialised, vocabulary sized to the tokenizer) or a local Hugging
    Face checkpoint directory, with its tokenizer; checks that the two agree."""
    if spec in models.PRESETS:
        tok = load_tokenizer(tokenizer, None)
        changes = parse_overrides(overrides)
        if dtype:
            changes.update(dtype=dtype, param_dtype=dtype)
        try:
            config = models.get_config(spec, vocab_size=tok.vocab_size, **changes)
        except ValueError as e:
            raise ExperimentError(str(e)) from None
        return Model(config, models.init(config, seed=seed), tok, spec)
    if not os.path.isdir(spec):
        raise ExperimentError(f"model not found: {spec!r} is neither a preset "
                              f"({', '.join(models.PRESETS)}) nor a directory")  # fmt: skip
    if overrides:
        raise ExperimentError(
            "model_overrides apply to presets only, not to a checkpoint directory"
        )
    config, params = hf.load_hf(spec, dtype=dtype or None)
    tok = load_tokenizer(tokenizer, spec)
    if tok.vocab_size > config.vocab_size:
        raise ExperimentError(
            f"vocabulary mismatch: the tokenizer has {tok.vocab_size} ids but the model in {spec} "
            f"has an embedding table of {config.vocab_size} rows"
        )
    return Model(config, params, tok, spec)


def save_model(path: str, model: Model, params) -> str:
    """Write `params` as a Hugging Face directory with the model's tokenizer beside them."""
    hf.save_hf(path, model.config, params)
    tokenizers.save_beside(path, model.tokenizer)
    return path


def same_tokenizer(a: Tokenizer, b: Tokenizer, sample_text: str) -> bool:
    """Whether two tokenizers agree on size, special ids and the ids of `sample_text`."""
    return (a.vocab_size, a.pad_id, a.bos_id, a.eos_id) == (
        b.vocab_size,
        b.pad_id,
        b.bos_id,
        b.eos_id,
    ) and a.encode(sample_text) == b.encode(sample_text)


# ---------------------------------------------------------------------------------------------
# tasks and checks


def countdown_task(c: ml_collections.ConfigDict) -> countdown.Countdown:
    try:
        return countdown.Countdown(
            num_numbers=tuple(c.num_numbers), number_range=tuple(c.number_range),
            target_range=tuple(c.target_range), min_solutions=c.min_solutions,
            test_fraction=c.test_fraction,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ExperimentError(f"bad task config: {e}") from None


def problems(task, split: str, n: int, seed: int) -> list:
    try:
        return task.prompts(split, n, seed)
    except ValueError as e:
        raise ExperimentError(f"{task.name}: {e}") from None


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    try:
        return [tokenizer.encode(t, add_bos=True) for t in texts]
    except ValueError as e:
        raise ExperimentError(f"the tokenizer cannot encode the task's text: {e}") from None


def check_lengths(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  what: str) -> None:  # fmt: skip
    """Prompts (padded to a multiple of 16, as the loops do) plus completions fit the model."""
    longest = max(len(p) for p in prompts)
    need = data.round_up(longest, 16) + max_new_tokens
    if need > config.max_seq_len:
        raise ExperimentError(
            f"{what}: the longest prompt ({longest} tokens, padded to {data.round_up(longest, 16)}) "
            f"plus max_new_tokens={max_new_tokens} is {need} tokens, more than the model's "
            f"max_seq_len {config.max_seq_len}; use a smaller task or fewer new tokens"
        )


def device_memory_bytes() -> int | None:
    """The first device's memory limit, or None where the backend does not report one (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def check_memory(config: ModelConfig, *, batch: int, seq_len: int, grad_accum: int = 1,
                 teacher_config: ModelConfig | None = None, sample_batch: int | None = None,
                 max_new_tokens: int | None = None, fused_kernel: bool = False) -> None:  # fmt: skip
    """Fail before compiling anything when the run cannot fit on one device (jaxpost.plan)."""
    try:
        p = plan.plan(
            config, "1,1,1", batch=batch, seq_len=min(seq_len, config.max_seq_len),
            grad_accum=grad_accum, teacher_config=teacher_config, sample_batch=sample_batch,
            max_new_tokens=max_new_tokens, fused_kernel=fused_kernel,
            device_memory_bytes=device_memory_bytes(), devices=1,
        )  # fmt: skip
    except ValueError as e:
        raise ExperimentError(f"memory plan: {e}") from None
    plan.check_fits(p)


def optim_config(c: ml_collections.ConfigDict, total_steps: int) -> train.OptimConfig:
    try:
        return train.OptimConfig(
            learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, total_steps=total_steps,
            end_lr_ratio=c.end_lr_ratio, weight_decay=c.weight_decay,
            clip_norm=c.clip_norm if c.clip_norm > 0 else None, grad_accum=c.grad_accum,
        )  # fmt: skip
    except ValueError as e:
        raise ExperimentError(f"bad optimizer config: {e}") from None


def loop_config(c: ml_collections.ConfigDict, *, seed: int, workdir: str | None, desc: str,
                **extra) -> loops.LoopConfig:  # fmt: skip
    try:
        return loops.LoopConfig(
            steps=c.steps, batch_size=c.batch_size, seed=seed, workdir=workdir,
            checkpoint_every=c.checkpoint_every, log_every=c.log_every, progress=c.progress,
            desc=desc, **extra,
        )  # fmt: skip
    except ValueError as e:
        raise ExperimentError(f"bad loop config: {e}") from None


# ---------------------------------------------------------------------------------------------
# evaluation and reporting


def eval_sets(config: ml_collections.ConfigDict, task) -> dict[str, tuple[Any, list]]:
    """{task name: (task, held-out problems)}: Countdown, and addition when asked for."""
    e = config.eval
    sets = {}
    if e.prompts > 0:
        sets["countdown"] = (task, problems(task, "test", e.prompts, e.seed))
    if e.addition_prompts > 0:
        add = addition.Addition()
        sets["addition"] = (add, problems(add, "test", e.addition_prompts, e.seed))
    return sets


def evaluate_model(label: str, config: ModelConfig, params, tokenizer: Tokenizer, sets: dict,
                   e: ml_collections.ConfigDict, render: dict | None = None) -> dict:  # fmt: skip
    """{task name: evaluate.summarize(...)} of one model; `render` maps a task name to a prompt
    renderer (e.g. OPSD's privileged view)."""
    out = {}
    start = time.perf_counter()
    for name, (task, probs) in sets.items():
        check_lengths(config, encode_prompts(tokenizer, [task.render_prompt(p) for p in probs]),
                      e.max_new_tokens, f"evaluation on {name}")  # fmt: skip
        samples = evaluate.sample(
            config, params, tokenizer, task, probs, n=e.samples, max_new_tokens=e.max_new_tokens,
            temperature=e.temperature, seed=e.seed, render=(render or {}).get(name),
        )  # fmt: skip
        out[name] = evaluate.summarize(samples, seed=e.seed)
    if sets:
        print(f"eval {label}: " + ", ".join(f"{name} {len(p)} problems x {e.samples}"
                                            for name, (_, p) in sets.items())
              + f" in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
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


def report(workdir: str, results: dict[str, dict], e: ml_collections.ConfigDict,
           start: float, model_dir: str) -> dict:  # fmt: skip
    """Print the evaluation table and the wall time; write WORKDIR/eval.json."""
    wall = time.perf_counter() - start
    if results and any(results.values()):
        print(format_table(results, e.samples))
    path = os.path.join(workdir, "eval.json")
    with open(path, "w") as f:
        json.dump({"results": results, "wall_s": wall}, f, default=float)
    print(f"wall time {wall:.0f} s; model saved to {model_dir}; evaluation in {path}")
    return {"results": results, "wall_s": wall, "model_dir": model_dir}


def scalars(result: dict, label: str, task: str = "countdown") -> dict[str, float]:
    """{"pass@1": ..., "coverage": ...} means of one model's evaluation in a run's result."""
    return {k: v["mean"] for k, v in result["results"][label][task]["scalars"].items()}
