"""The head-to-head: SFT vs GRPO vs on-policy distillation from one base, one budget, one report.

    python -m experiments.paradigms --workdir=/tmp/jaxpost_paradigms

Trains (or reuses from the workdir) a base student and a teacher, then every arm from the base
with the same budget, evaluates base, teacher and arms on held-out Countdown problems (64
samples each), and writes report.md, metrics.json and PNG plots (pass@k, CoT-pass@k, radar,
diversity against pass@1, training curves) into the workdir. A progress bar per stage shows
the ETA; rerunning the same command after an interruption reuses the cached models, finished
arms and the interrupted arm's last checkpoint. See `jaxpost.paradigms` for the protocol.

Flags choose the arms (`--arms=grpo,opd_rkl`), the seed and every budget; `--mini` runs the
seconds-scale protocol the test suite uses.
"""

import os

os.environ.setdefault("NO_GCE_CHECK", "true")

import dataclasses  # noqa: E402

from absl import app, flags  # noqa: E402

from jaxpost import paradigms  # noqa: E402

_D = paradigms.Settings(workdir="")

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/jaxpost_paradigms", "report, models, arms go here")
_ARMS = flags.DEFINE_list("arms", list(_D.arms), f"arms to run, from: {', '.join(paradigms.ARMS)}")
_SEED = flags.DEFINE_integer("seed", _D.seed, "seed of problems, initialisation and sampling")
_MINI = flags.DEFINE_bool("mini", False, "the miniature protocol (seconds; for smoke tests)")
_BASE_STEPS = flags.DEFINE_integer("base_steps", _D.base_steps, "SFT steps of the base")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", _D.teacher_steps, "extra teacher steps")
_ARM_STEPS = flags.DEFINE_integer("arm_steps", _D.arm_steps, "updates per arm (the budget)")
_PROMPTS = flags.DEFINE_integer("prompts_per_step", _D.prompts_per_step, "prompts per update")
_GROUP = flags.DEFINE_integer("group_size", _D.group_size, "samples per prompt (GRPO group)")
_LR = flags.DEFINE_float("arm_lr", _D.arm_lr, "peak learning rate of every arm")
_EVAL_PROBLEMS = flags.DEFINE_integer("eval_problems", _D.eval_problems, "held-out problems")
_EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", _D.eval_samples, "samples per problem (n)")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")


def settings_from_flags() -> paradigms.Settings:
    if _MINI.value:
        return paradigms.miniature(_WORKDIR.value, arms=tuple(_ARMS.value), seed=_SEED.value,
                                   progress=_PROGRESS.value)  # fmt: skip
    return dataclasses.replace(
        _D, workdir=_WORKDIR.value, arms=tuple(_ARMS.value), seed=_SEED.value,
        base_steps=_BASE_STEPS.value, teacher_steps=_TEACHER_STEPS.value,
        arm_steps=_ARM_STEPS.value, prompts_per_step=_PROMPTS.value, group_size=_GROUP.value,
        arm_lr=_LR.value, eval_problems=_EVAL_PROBLEMS.value, eval_samples=_EVAL_SAMPLES.value,
        progress=_PROGRESS.value,
    )  # fmt: skip


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        settings = settings_from_flags()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    result = paradigms.run(settings)
    print("\n| arm | pass@1 | pass@large_k | diversity | retention | steerability |")
    print("|---|---|---|---|---|---|")
    for name, arm in result["arms"].items():
        s = arm["scalars"]
        cells = [f"{s[k]['mean']:.3f}" for k in ("pass@1", "pass@large_k", "diversity",
                                                 "retention", "steerability")]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for c in result["claims"]:
        print(f"[{c['verdict']}] {c['claim']} — {c['evidence']}")
    print(f"\nreport: {os.path.join(settings.workdir, 'report.md')} "
          f"({result['settings']['wall_seconds']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
