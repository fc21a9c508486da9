"""GRPO with a task's verifier as the reward, from an SFT model; evaluated before and after.

    python -m experiments.grpo --workdir=/tmp/jaxpost_grpo
    python -m experiments.grpo --workdir=/tmp/jaxpost_grpo --model=/tmp/jaxpost_sft/model
    python -m experiments.grpo --config=experiments/configs/grpo.py:tiny --workdir=/tmp/grpo_tiny

The student: `--model=DIR`, a Hugging Face directory such as the WORKDIR/model that
experiments.sft writes, is trained as it is. A preset (the default "small") is first SFT-trained
here with the `sft` stage (the defaults of experiments/configs/sft.py) into WORKDIR/sft_init,
which a rerun reuses.

Prints the processes and devices, the starting model, a progress bar (reward, pass rate of the
rollouts, ...), then the held-out evaluation of the starting model and of the GRPO model (pass@1
and pass@64 with 95% bootstrap intervals, CoT-pass@1, coverage, distinct correct solutions per
problem), the wall time and WORKDIR/model, the GRPO model as a Hugging Face directory.
WORKDIR/metrics.jsonl has the training curve, WORKDIR/eval.json the full pass@k curves.

Measured on the project's 2-core CPU (AMD EPYC Zen 5, otherwise idle, XLA:CPU, 2026-12-06,
8e0c626), defaults, 64 held-out problems x 64 samples, the second command as printed (--model =
experiments.sft's model):

    model       task       pass@1                pass@64                cot_pass@1  coverage  distinct
    start       countdown  0.206 [0.165,0.250]   0.891 [0.812,0.953]         0.051     0.891      2.03
    after GRPO  countdown  0.369 [0.289,0.446]   0.891 [0.812,0.953]         0.076     0.891      1.59

with the rollout pass rate going 0.220 (first 10 rounds) -> 0.320 (last 10). pass@1 rises while
the distinct solutions per problem fall and pass@64 and coverage stay (an earlier tree on the
Zen 3 CPU, 2026-12-02: pass@1 0.203 -> 0.401, pass@64 0.922 -> 0.875, the intervals
overlapping), as expected if RL sharpens the policy onto solutions it already finds. Wall time
45 s for the command (GRPO's 100 rounds 35 s; 98 s and 85 s on the Zen 3 CPU). Without --model
it first trains its own SFT start (measured 2026-11-25 on a shared machine: 353 s in all).

Variants: "tiny" (seconds), "pretrained" (a checkpoint given with --model: bfloat16, lr 1e-6,
256 new tokens). Overrides: `--config.grpo.unlikeliness_beta=0.25` (He et al.'s unlikeliness
reward), `--config.grpo.kl_beta=0.04` (k3 KL penalty to the starting model),
`--config.grpo.loss_type=dr_grpo --config.grpo.advantage_scale=none` (Dr. GRPO),
`--config.reward=chain` (reward only answers whose chain of steps verifies too);
GRPO practice: `--config.grpo.dynamic_sampling=true` (DAPO's dynamic sampling),
`--config.grpo.mask_truncated=true --config.grpo.overlong_buffer=8` (DAPO's overlong filtering and
soft penalty), `--config.grpo.entropy_top_frac=0.2` (train only the 20% highest-entropy tokens),
`--config.grpo.entropy_coef=0.001` (entropy bonus).
"""

import ml_collections

from experiments import configs


def get_config(arg: str | None = None):
    c = configs.shared()
    c.sft = configs.sft_stage(steps=300)  # the built-in student when `model` is a preset
    c.train_problems = 1500  # prompt pool: the task's train problems (the SFT stage's, same seed)
    c.reward = "answer"  # 1 when the final answer verifies; "chain": answer and every step

    c.grpo = ml_collections.ConfigDict()
    c.grpo.loss_type = "dapo"  # token-mean over the batch; "grpo", "bnpo", "dr_grpo"
    c.grpo.eps_low = 0.2  # clip range [1 - eps_low, 1 + eps_high]
    c.grpo.eps_high = 0.28  # DAPO's clip-higher
    c.grpo.kl_beta = 0.0  # k3 KL penalty to the starting model (0: none, no reference forward)
    c.grpo.num_iterations = 1  # updates per rollout batch
    c.grpo.advantage_scale = "group"  # divide by the group's std; "batch", "none" (Dr. GRPO)
    c.grpo.unlikeliness_beta = 0.0  # He et al.'s rank discount of likely correct samples (0: off)
    # importance correction π_old/q between the sampler's tempered/truncated distribution q and
    # the policy (jaxpost.importance; a no-op at temperature 1 without top-k/top-p)
    c.grpo.is_correction = True
    c.grpo.is_mode = "sequence_mask"  # token_truncate, token_mask, sequence_truncate, sequence_mask
    c.grpo.is_min = 0.0  # lower bound of the weight (0: none)
    c.grpo.is_max = 3.0  # upper bound: truncated to it, or masked above it
    # GRPO practice (jaxpost.shaping), each off by default
    c.grpo.dynamic_sampling = False  # DAPO: drop all-equal-reward groups, refill the batch
    c.grpo.max_sampling_rounds = 4  # sampling rounds per step at most when refilling
    c.grpo.mask_truncated = False  # DAPO: completions that ran out of tokens leave the loss
    c.grpo.overlong_buffer = 0  # DAPO's soft overlong penalty window in tokens (0: off)
    c.grpo.overlong_factor = 1.0  # the penalty at the budget's end
    c.grpo.entropy_top_frac = 1.0  # train the top fraction of tokens by entropy (0.2: Wang et al.)
    c.grpo.entropy_coef = 0.0  # entropy bonus: loss - coef * mean policy entropy

    # tiny SFT models: lr >= 1e-3 wrecks them on Adam's first step
    c.optim = configs.optimizer(learning_rate=1e-4, warmup_steps=10)
    c.loop = configs.loop(steps=100, batch_size=16, checkpoint_every=50, log_every=5)
    c.sampling = configs.sampling(group_size=8)
    c.eval = configs.evaluation()
    return configs.with_variant(c, arg, {"tiny": _tiny, "pretrained": _pretrained})


def _tiny(c) -> None:
    c.model = "tiny"
    configs.tiny_stage(c.sft)
    c.train_problems = 48
    c.optim.warmup_steps = 1
    c.loop.steps, c.loop.batch_size, c.loop.checkpoint_every, c.loop.log_every = 3, 4, 0, 1
    c.loop.progress = False
    c.sampling.group_size = 2
    configs.tiny_eval(c.eval)


def _pretrained(c) -> None:
    c.model = ""  # required: --model=DIR
    c.dtype = "bfloat16"
    c.optim.learning_rate, c.optim.warmup_steps = 1e-6, 5
    c.loop.steps, c.loop.batch_size, c.loop.checkpoint_every = 100, 8, 25
    c.sampling.max_new_tokens = 256
    configs.pretrained_eval(c.eval)
