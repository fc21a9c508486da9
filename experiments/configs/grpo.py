"""GRPO with the Countdown verifier's reward, starting from an SFT model.

    python -m experiments.grpo --config=experiments/configs/grpo.py --workdir=/tmp/jaxpost_grpo

or, reusing the model that experiments.sft saved (the same model: same config and seed):

    python -m experiments.grpo --config=experiments/configs/grpo.py --workdir=/tmp/jaxpost_grpo \\
        --init=/tmp/jaxpost_sft/model

Starting point: `--init=DIR` (or its synonym `--model=DIR`), a Hugging Face directory such as the
WORKDIR/model that experiments.sft writes. Without one, the run first trains its own with the
SFT stage in `config.sft` (the defaults of experiments/configs/sft.py) into WORKDIR/sft_init and
reuses that directory when rerun. A --init directory that does not exist is an error.

Prints the starting model, a progress bar (reward, pass rate of the rollouts, ...), then the
held-out evaluation of the starting model and of the GRPO model (pass@1 and pass@64 with 95%
bootstrap intervals, CoT-pass@1, coverage, distinct correct solutions per problem), the wall time
and WORKDIR/model, the GRPO model as a Hugging Face directory. WORKDIR/metrics.jsonl has the
training curve, WORKDIR/eval.json the full pass@k curves.

Measured on a 2-core CPU shared with other jobs (load average 2.5-4.5), defaults, 64 held-out
problems x 64 samples; both commands print the same table (the runs are deterministic):

    model       task       pass@1                pass@64                cot_pass@1  coverage  distinct
    start       countdown  0.206 [0.164,0.249]   0.906 [0.844,0.969]         0.043     0.906      2.08
    after GRPO  countdown  0.370 [0.290,0.448]   0.828 [0.734,0.922]         0.075     0.828      1.47

with the rollout pass rate going 0.209 (first 10 rounds) -> 0.331 (last 10). pass@1 rises while
pass@64, coverage and the distinct solutions per problem fall (the pass@64 intervals overlap at
this size), as expected if RL sharpens the policy onto solutions it already finds. Wall time: 353 s without --init (its SFT 195 s, GRPO's 100 rounds
119 s, two evaluations 33 s); 207 s with --init.

Variants: `--config.grpo.unlikeliness_beta=0.25` (He et al.'s unlikeliness reward: correct but
likely samples earn less), `--config.grpo.kl_beta=0.04` (k3 KL penalty to the starting model),
`--config.grpo.loss_type=dr_grpo --config.grpo.advantage_scale=none` (Dr. GRPO),
`--config.reward=chain` (reward only answers whose chain of steps verifies too).
"""

import ml_collections

from experiments import configs


def get_config():
    c = ml_collections.ConfigDict()
    c.init = ""  # starting model, a HF directory; "" trains one with `sft` into WORKDIR/sft_init
    c.tokenizer = "auto"  # "auto": the directory's own (see experiments/common.py), "char", a dir
    c.dtype = ""  # "" keeps the checkpoint's dtype
    c.sft = configs.sft_stage(steps=300)  # the built-in starting point (used when init is "")
    c.task = configs.countdown()
    c.train_problems = 1500  # prompt pool: Countdown train problems (the SFT stage's, same seed)
    c.reward = "answer"  # 1 when the final answer verifies; "chain": answer and every step

    c.grpo = ml_collections.ConfigDict()
    c.grpo.loss_type = "dapo"  # token-mean over the batch; "grpo", "bnpo", "dr_grpo"
    c.grpo.eps_low = 0.2  # clip range [1 - eps_low, 1 + eps_high]
    c.grpo.eps_high = 0.28  # DAPO's clip-higher
    c.grpo.kl_beta = 0.0  # k3 KL penalty to the starting model (0: none, no reference forward)
    c.grpo.num_iterations = 1  # updates per rollout batch
    c.grpo.advantage_scale = "group"  # divide by the group's std; "batch", "none" (Dr. GRPO)
    c.grpo.unlikeliness_beta = 0.0  # He et al.'s rank discount of likely correct samples (0: off)

    # tiny SFT models: lr >= 1e-3 wrecks them on Adam's first step
    c.optim = configs.optimizer(learning_rate=1e-4, warmup_steps=10)

    c.loop = ml_collections.ConfigDict()
    c.loop.steps = 100  # rollout rounds
    c.loop.batch_size = 16  # prompts per round
    c.loop.group_size = 8  # samples per prompt (the GRPO group)
    c.loop.max_new_tokens = 32
    c.loop.temperature = 1.0  # rollout temperature
    c.loop.checkpoint_every = 50
    c.loop.log_every = 5
    c.loop.progress = True

    c.eval = configs.evaluation()
    c.workdir = "/tmp/jaxpost_grpo"  # sft_init/, metrics.jsonl, checkpoints/, model/, eval.json
    c.seed = 0
    return c
