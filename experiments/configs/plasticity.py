"""Plasticity: several SFT starting points, the same GRPO from each, which predictor ranks them.

    python -m experiments.plasticity --workdir=/tmp/jaxpost_plasticity
    python -m experiments.plasticity --config=experiments/configs/plasticity.py:tiny --workdir=DIR

The head-to-head's config (its task, base model, GRPO arm budget and evaluation; the base is
cached in WORKDIR/models like the head-to-head's, so a paradigms workdir's base is reused) plus
`plasticity`: the SFT starting points (every `sft_steps` × `styles`, step 0 being the base
itself), their learning rate, and the reference solutions per held-out problem of the held-out
NLL. The program is `jaxpost.plasticity.run`; it writes plasticity.md, plasticity.json and
plasticity.png.
"""

import ml_collections

from experiments.configs import paradigms


def get_config(arg: str | None = None):
    c = paradigms.get_config(arg)
    c.plasticity = ml_collections.ConfigDict()
    # SFT steps of each starting point (0: the base) x the solution slices it trains on
    # ("all": the full solution set; "first": one canonical solution per problem)
    c.plasticity.sft_steps = "0,100,400"
    c.plasticity.styles = "all,first"
    c.plasticity.sft_learning_rate = 1e-4
    c.plasticity.nll_solutions = 4  # reference solutions per held-out problem (held-out NLL)
    if c.variant == "tiny":
        c.plasticity.sft_steps, c.plasticity.styles = "0,2,4", "all"
        c.plasticity.nll_solutions = 2
    return c
