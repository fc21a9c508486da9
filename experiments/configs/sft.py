"""SFT of a tiny model on Countdown solutions, evaluated on held-out problems before and after.

    python -m experiments.sft --config=experiments/configs/sft.py --workdir=/tmp/jaxpost_sft

Prints the model and data sizes, a progress bar, then a table of the held-out evaluation of the
model before and after training (pass@1 and pass@64 with 95% bootstrap intervals, CoT-pass@1,
coverage = share of problems solved by at least one of the 64 samples, distinct correct solutions
per problem), the wall time, and where the trained model was saved as a Hugging Face directory
(WORKDIR/model; grpo.py and opd.py take it with --init / --teacher). WORKDIR/eval.json holds both
summaries with the full pass@k curves, WORKDIR/metrics.jsonl the training curve.

Measured on a 2-core CPU shared with other jobs (load average 4-6), defaults, "small" preset
(0.80M parameters), 64 held-out problems x 64 samples at temperature 1:

    model      task       pass@1                pass@64                cot_pass@1  coverage  distinct
    before     countdown  0.000 [0.000,0.000]   0.000 [0.000,0.000]         0.000     0.000      0.00
    after SFT  countdown  0.206 [0.164,0.249]   0.906 [0.844,0.969]         0.043     0.906      2.08
    wall time 237 s (each evaluation about 15-20 s; the final training loss 0.22)

(cot_pass@1 stays low: the final expression is often right while a step of the chain is not.)

Overrides: `--config.loop.steps=100`, `--config.model=tiny`,
`--config.model_overrides=d_model=96,n_layers=3,head_dim=24,mlp_dim=256`,
`--config.data.addition_problems=500 --config.eval.addition_prompts=32` (also learn addition and
evaluate it), `--model=DIR` (start from a local Hugging Face checkpoint instead of a preset).
"""

from experiments import configs


def get_config():
    c = configs.sft_stage(steps=300)
    c.task = configs.countdown()
    c.eval = configs.evaluation()
    c.workdir = "/tmp/jaxpost_sft"  # metrics.jsonl, checkpoints/, model/ (HF), eval.json
    c.seed = 0  # data order and every other random choice of the run
    return c
