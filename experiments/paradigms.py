"""The head-to-head: SFT vs GRPO vs on-policy distillation from one base, one budget, one report.

    python -m experiments.paradigms --workdir=/tmp/jaxpost_paradigms
    python -m experiments.paradigms --mini --workdir=/tmp/jaxpost_mini   # the tiny variant

`--mini` is `--config=experiments/configs/paradigms.py:tiny` (seconds-scale budgets: the
pipeline end to end, numbers that mean nothing).

The config (its fields, variants, the commands and their measured cost) is
experiments/configs/paradigms.py; the program is `jaxpost.headtohead.run`. It prints the table
of the main scalars per arm and the literature's claims with their verdicts.
"""

import os
import sys

from experiments import common
from jaxpost import headtohead

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "paradigms.py") + ":tiny"


def expand_mini(argv: list[str]) -> list[str]:
    """`--mini` → the tiny variant's --config (refused beside another --config)."""
    if "--mini" not in argv:
        return argv
    if any(a.startswith("--config=") or a == "--config" for a in argv):
        print("experiments.paradigms: error: --mini is the tiny variant's --config; give one of "
              "them", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    return [f"--config={TINY}" if a == "--mini" else a for a in argv]


def run(config) -> dict:
    result = headtohead.run(config)
    axes = [a for a in ("pass@1", "pass@large_k", "diversity", "retention", "steerability")
            if a in result["radar_axes"]]  # fmt: skip
    print("\n| arm | " + " | ".join(axes) + " |")
    print("|---|" + "---|" * len(axes))
    for name, arm in result["arms"].items():
        s = arm["scalars"]
        cells = ["diverged" if arm.get("diverged") else f"{s[k]['mean']:.3f}" for k in axes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for c in result["claims"]:
        print(f"[{c['verdict']}] {c['claim']} — {c['evidence']}")
    report = f"{config.workdir}/report.md"
    print(f"\nreport: {report} ({result['settings']['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    sys.argv = expand_mini(sys.argv)
    common.run_main("experiments.paradigms", run, "paradigms")
