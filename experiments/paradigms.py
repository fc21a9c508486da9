"""The head-to-head: SFT vs GRPO vs on-policy distillation from one base, one budget, one report.

    python -m experiments.paradigms --workdir=/tmp/jaxpost_paradigms

Trains (or reuses from the workdir) a base student and a teacher, then every arm from the base
with the same budget, evaluates base, teacher and arms on held-out Countdown problems (64
samples each), and writes report.md, metrics.json and PNG plots (pass@k, CoT-pass@k, radar,
diversity against pass@1, training curves) into the workdir. A progress bar per stage shows
the ETA; rerunning the same command after an interruption reuses the cached models, finished
arms and the interrupted arm's last checkpoint. See `jaxpost.paradigms` for the protocol.

Flags choose the arms (`--arms=grpo,opd_rkl`), the seed and every budget; `--mini` runs the
seconds-scale protocol the test suite uses. At scale, on a GPU node or a TPU VM:

    python -m experiments.paradigms --workdir=DIR --model=/ckpt/Qwen2.5-0.5B-Instruct \\
        --teacher=/ckpt/Qwen2.5-1.5B-Instruct --task=gsm8k --gsm8k_dir=/data/gsm8k \\
        --dtype=bfloat16 --mesh=fsdp=-1 --loss_impl=pallas_gpu

starts from the checkpoint (its tokenizer beside it), distills from the teacher (same tokenizer
and vocabulary), shards every arm over the local devices and runs the OPD losses through the
fused kernel. Budget flags left unset take the defaults for a pretrained base
(`paradigms.PRETRAINED_DEFAULTS`: the checkpoint as it is, lr 1e-6).

Flags are defined only when this module runs as a program, so importing it defines none. Bad
flags and bad inputs (`paradigms.InputError`, `hf.CheckpointError`) end with a one-line error and
status 1; anything else keeps its traceback.
"""

import os

os.environ.setdefault("NO_GCE_CHECK", "true")

import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from jaxpost import paradigms  # noqa: E402
from jaxpost.models import hf  # noqa: E402

_D = paradigms.Settings(workdir="")
# flag -> (kind, default, help); a None default leaves the Settings default (which may depend on
# whether --model is given).
_FLAGS = {
    "workdir": ("string", "/tmp/jaxpost_paradigms", "report, models, arms go here"),
    "arms": ("list", list(_D.arms), f"arms to run, from: {', '.join(paradigms.ARMS)}"),
    "seed": ("integer", _D.seed, "seed of problems, initialisation and sampling"),
    "mini": ("bool", False, "the miniature protocol (seconds; for smoke tests)"),
    "task": ("string", _D.task, f"the task: {', '.join(paradigms.TASKS)}"),
    "gsm8k_dir": ("string", "", "GSM8K: directory with train.jsonl and test.jsonl"),
    "tfds_data_dir": ("string", "", "GSM8K: a prepared TFDS data_dir holding gsm8k"),
    "model": ("string", "", "a Hugging Face checkpoint directory: the base (default: built-in)"),
    "teacher": ("string", "", "a Hugging Face checkpoint directory: the OPD teacher"),
    "dtype": ("string", "", "load checkpoints in this dtype, e.g. bfloat16"),
    "mesh": ("string", "", "device mesh for the arms, e.g. 1,8,1 or fsdp=-1 (default: one device)"),
    "loss_impl": ("string", "", "fused OPD loss: xla, pallas_gpu or pallas_tpu (default: dense)"),
    "base_steps": ("integer", None, "SFT steps of the base (default 800; 0 with --model)"),
    "teacher_steps": ("integer", _D.teacher_steps, "extra SFT steps of a built teacher"),
    "pretrain_lr": ("float", None, "learning rate of base/teacher SFT"),
    "arm_steps": ("integer", _D.arm_steps, "updates per arm (the budget)"),
    "prompts_per_step": ("integer", _D.prompts_per_step, "prompts per update"),
    "group_size": ("integer", _D.group_size, "samples per prompt (GRPO group)"),
    "arm_lr": ("float", None, "peak learning rate of every arm (default 1e-4; 1e-6 with --model)"),
    "max_new_tokens": ("integer", None, "completion budget (default 32 Countdown, 256 GSM8K)"),
    "eval_problems": ("integer", _D.eval_problems, "held-out problems"),
    "eval_samples": ("integer", _D.eval_samples, "samples per problem (n)"),
    "progress": ("bool", True, "show progress bars"),
}
_SETTINGS_FIELDS = [name for name in _FLAGS if name not in ("mini", "arms")]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    for name, (kind, default, help_) in _FLAGS.items():
        getattr(flags, f"DEFINE_{kind}")(name, default, help_, flag_values=flag_values)


def settings_from_flags(fv: flags.FlagValues = flags.FLAGS) -> paradigms.Settings:
    given = {name: fv[name].value for name in _SETTINGS_FIELDS if fv[name].value is not None}
    given["arms"] = tuple(fv["arms"].value)
    if fv["mini"].value:
        budgets = ("base_steps", "teacher_steps", "arm_steps", "prompts_per_step", "group_size",
                   "eval_problems", "eval_samples", "max_new_tokens")  # fmt: skip
        mini = {k: v for k, v in given.items() if k not in budgets or fv[k].present}
        return paradigms.miniature(mini.pop("workdir"), **mini)
    return paradigms.Settings(**given)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    try:
        settings = settings_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        result = paradigms.run(settings)
    except (paradigms.InputError, hf.CheckpointError) as e:  # found while loading inputs
        print(f"experiments.paradigms: error: {e}", file=sys.stderr)
        sys.exit(1)
    axes = [a for a in ("pass@1", "pass@large_k", "diversity", "retention", "steerability")
            if a in result["radar_axes"]]  # fmt: skip
    print("\n| arm | " + " | ".join(axes) + " |")
    print("|---|" + "---|" * len(axes))
    for name, arm in result["arms"].items():
        s = arm["scalars"]
        print(f"| {name} | " + " | ".join(f"{s[k]['mean']:.3f}" for k in axes) + " |")
    print()
    for c in result["claims"]:
        print(f"[{c['verdict']}] {c['claim']} — {c['evidence']}")
    print(f"\nreport: {os.path.join(settings.workdir, 'report.md')} "
          f"({result['settings']['wall_seconds']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    define_flags()
    app.run(main)
