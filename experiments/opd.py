"""On-policy distillation (OPD) and self-distillation (OPSD); evaluated before and after.

    python -m experiments.opd --workdir=/tmp/jaxpost_opd --teacher=/tmp/jaxpost_sft/model

The config (its fields, variants, the command and what it printed) is
experiments/configs/opd.py; the program is `jaxpost.recipes.opd.run`.
"""

from experiments import common
from jaxpost.recipes import opd

if __name__ == "__main__":
    common.run_main("experiments.opd", opd.run, "opd")
