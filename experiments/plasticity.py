"""Plasticity ("Quagmires in SFT-RL Post-Training"): which SFT checkpoint does RL improve most?

    python -m experiments.plasticity --workdir=/tmp/jaxpost_plasticity

The config is experiments/configs/plasticity.py; the program `jaxpost.plasticity.run`. It prints
the starting points and each predictor's Spearman rho with post-RL pass@1 (95% CI).
"""

from experiments import common
from jaxpost import plasticity


def run(config) -> dict:
    out = plasticity.run(config)
    with open(f"{config.workdir}/plasticity.md") as f:
        print(f.read())
    print(f"report: {config.workdir}/plasticity.md ({out['wall_seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    common.run_main("experiments.plasticity", run, "plasticity")
