"""GRPO with a task's verifier as the reward, from an SFT model; evaluated before and after.

    python -m experiments.grpo --workdir=/tmp/jaxpost_grpo --model=/tmp/jaxpost_sft/model

The config (its fields, variants, the command and what it printed) is
experiments/configs/grpo.py; the program is `jaxpost.recipes.grpo.run`.
"""

from experiments import common
from jaxpost.recipes import grpo

if __name__ == "__main__":
    common.run_main("experiments.grpo", grpo.run, "grpo")
