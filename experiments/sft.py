"""SFT on a task's reference solutions, evaluated before and after.

    python -m experiments.sft --workdir=/tmp/jaxpost_sft

The config (its fields, variants, the command and what it printed) is
experiments/configs/sft.py; the program is `jaxpost.recipes.sft.run`.
"""

from experiments import common
from jaxpost.recipes import sft

if __name__ == "__main__":
    common.run_main("experiments.sft", sft.run, "sft")
