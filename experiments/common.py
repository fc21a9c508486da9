"""Flag plumbing every experiment main shares: one config system, one error line, many hosts.

A main is its config module plus one call into jaxpost:

    if __name__ == "__main__":
        common.run_main("experiments.sft", recipes.sft.run, "sft")

which defines, only when the module runs as a program (so importing several mains never defines
a flag twice):

    --config=experiments/configs/<main>.py[:variant]   the ConfigDict (default: that file);
                                                      --config.a.b=value overrides a field
    --workdir, --model, --teacher, --task, --mesh,     shorthands for the config fields of those
    --arms                                            names (--task sets config.task.name)

Before anything else touches JAX, the main starts the multi-controller runtime when the
environment describes several processes (`jaxpost.distributed`; a no-op for one process) and
prints how many processes and devices it runs on. A `jaxpost.UserError` (bad flags, missing or
malformed files, a mesh that does not fit, a plan that does not fit in memory, a workdir another
run holds) ends the program with one line on stderr and status 1, a diverged run with status 3,
a preempted one (SIGTERM; its checkpoint saved) with 143 (`jaxpost.errors`); any other exception
keeps its traceback.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_GCE_CHECK", "true")

import sys  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SHORTHANDS = {
    "workdir": ("workdir", "run directory (sets config.workdir)"),
    "model": ("model", "the student: a preset name or a local Hugging Face checkpoint directory "
                       "(sets config.model)"),
    "teacher": ("teacher", "a distillation teacher, a local Hugging Face directory (sets "
                           "config.teacher)"),
    "task": ("task.name", "the task: countdown, gsm8k or addition (sets config.task.name)"),
    "mesh": ("mesh", "device mesh data,fsdp,tensor, e.g. 2,2,2 or fsdp=-1 (sets config.mesh)"),
    "arms": ("arms", "the head-to-head's arms, comma-separated, or all (sets config.arms)"),
}  # fmt: skip


def define_flags(config_name: str, *, flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: list[str] | None = None) -> dict[str, flags.FlagHolder]:  # fmt: skip
    """Define --config (default experiments/configs/<config_name>.py) and the shorthand flags,
    as key flags of the calling main (so its --help lists them)."""
    holders = {
        "config": config_flags.DEFINE_config_file(
            "config", os.path.join(CONFIGS, f"{config_name}.py"),
            f"experiment config, experiments/configs/{config_name}.py[:variant] with variant "
            f"tiny or pretrained; --config.a.b=value overrides one field",
            flag_values=flag_values, sys_argv=sys_argv,
        )  # fmt: skip
    }
    for name, (_, help_) in SHORTHANDS.items():
        holders[name] = flags.DEFINE_string(name, None, help_, flag_values=flag_values)
    for name in holders:  # key flags of the program (absl's --help lists those of argv[0])
        flag_values.register_key_flag_for_module(sys.argv[0], flag_values[name])
    return holders


def config_from_flags(holders: dict[str, flags.FlagHolder]) -> ml_collections.ConfigDict:
    """The --config ConfigDict with the shorthand flags applied (an unlocked copy)."""
    config = ml_collections.ConfigDict(holders["config"].value.to_dict())
    for name, (field, _) in SHORTHANDS.items():
        value = holders[name].value
        if value is None:
            continue
        node = config
        *parents, leaf = field.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise app.UsageError(f"--{name} does not apply to this main (no config.{field})")
        node[leaf] = value
    return config


def run_main(name: str, run: Callable[[ml_collections.ConfigDict], object],
             config_name: str) -> None:  # fmt: skip
    """Define the flags and `app.run` the main: start JAX's distributed runtime, build the
    config from the flags, `run(config)`; a `UserError` is one line on stderr, status 1."""
    holders = define_flags(config_name)

    def main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
        from jaxpost import distributed
        from jaxpost.errors import Preempted, UserError

        try:
            distributed.maybe_initialize_distributed()  # before any other JAX work
        except ValueError as e:  # an incomplete JAX_* / SLURM environment
            print(f"{name}: error: multi-process start-up: {e}", file=sys.stderr)
            sys.exit(1)
        try:
            config = config_from_flags(holders)
        except OSError as e:  # ml_collections defers a --config file that did not load to here
            print(f"{name}: error: cannot load the --config file: "
                  f"{str(e).strip().splitlines()[-1].strip()}", file=sys.stderr)  # fmt: skip
            sys.exit(1)
        try:
            run(config)
        except (UserError, Preempted) as e:  # exit statuses: jaxpost.errors
            print(f"{name}: {'' if isinstance(e, Preempted) else 'error: '}{e}", file=sys.stderr)
            sys.exit(e.exit_status)

    app.run(main, flags_parser=lambda argv: _parse_flags(name, argv))


def _parse_flags(name: str, argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag (an unknown `--config.foo`, a value of the wrong type)
    reported in one line instead of after the whole --help."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a config file that raised: its first line and its error
        lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
        text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
        print(f"{name}: error: {text}; see --help", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.path with no such field
        while isinstance(e, BaseException) and e.args:
            e = e.args[0]
        print(f"{name}: error: unknown config field {str(e).replace(chr(10), '; ')}; see --help",
              file=sys.stderr)  # fmt: skip
    sys.exit(1)
