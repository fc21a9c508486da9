"""The single-paradigm programs: what `experiments.sft`, `.grpo` and `.opd` run, one call each.

    from jaxpost.recipes import sft
    result = sft.run(config)      # config: experiments/configs/sft.py's ConfigDict

Each `run(config)` checks the workdir, loads and checks the inputs (`jaxpost.inputs`), plans the
memory of the step it is about to compile (`jaxpost.plan`), evaluates the starting model, trains
(`jaxpost.loops`), evaluates again, saves the model as a Hugging Face directory and writes
eval.json. Bad input raises `jaxpost.UserError`. Several processes run the same call; process 0
prints and writes, every process takes part in the computation and the checkpoints.
"""
