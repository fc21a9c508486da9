"""Every experiment command README.md prints parses as printed, and its settings pass the main's
own checks: the flags exist, each `--config.a.b` names a field of that main's config (variant
included) and parses as its type, and the checks a main runs before it loads anything
(`recipes.grpo._check`, `recipes.opd._check`, `headtohead.settings.check` and its arm list)
accept it. So a renamed field or a value the code stopped accepting fails here, in the fast
tier, instead of in a reader's shell. (Run end to end as printed: the --mini command in
tests/test_headtohead.py and the launchers' dry runs in tests/test_launchers.py.)
"""

import re
import shlex
from pathlib import Path

import pytest
from absl import flags

from experiments import common
from experiments import paradigms as paradigms_main
from jaxpost.errors import UserError
from jaxpost.headtohead import arms, settings
from jaxpost.recipes import grpo, opd

README = Path(__file__).resolve().parents[1] / "README.md"
CHECKS = {"grpo": [grpo._check], "opd": [opd._check], "paradigms": [settings.check, arms.arm_names]}


def readme_commands() -> list[tuple[str, list[str]]]:
    """(main, argv after the module) of each `python -m experiments.<main>` in a bash block."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "-m" in words and words[words.index("-m") + 1].startswith("experiments."):
                at = words.index("-m")
                out.append((words[at + 1].removeprefix("experiments."), words[at + 2:]))
    return out


COMMANDS = readme_commands()


def test_the_readme_prints_every_main():
    assert {main for main, _ in COMMANDS} == {"sft", "grpo", "opd", "paradigms", "plasticity"}
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("main,args", COMMANDS, ids=[" ".join(a)[-60:] for _, a in COMMANDS])
def test_a_readme_command_parses_and_passes_its_checks(main, args):
    argv = ["prog", *(paradigms_main.expand_mini(["prog", *args])[1:])]
    fv = flags.FlagValues()
    holders = common.define_flags(main, flag_values=fv, sys_argv=argv)
    fv(argv)
    config = common.config_from_flags(holders)
    placeholders = [w.split("=", 1)[1] for w in args if re.match(r"--\w+=/(ckpt|data)/", w)]
    try:
        for check in CHECKS.get(main, []):
            check(config)
    except UserError as e:  # only the README's placeholder checkpoints may be missing here
        assert "not found" in str(e) and any(p in str(e) for p in placeholders), e
