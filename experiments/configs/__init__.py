"""Pieces the experiment configs share: the Countdown task, an SFT stage, the evaluation.

Each config module (`sft.py`, `grpo.py`, `opd.py`) assembles its `ml_collections.ConfigDict` from
these, so the three paradigms train and evaluate on the same task with the same settings unless
a flag says otherwise. Fields that may be "unset" are empty strings, never None: config_flags
needs a typed default to parse a `--config.field=value` override.
"""

from __future__ import annotations

import ml_collections


def countdown() -> ml_collections.ConfigDict:
    """Knobs of `jaxpost.tasks.countdown.Countdown`: three numbers, one or two operations."""
    c = ml_collections.ConfigDict()
    c.num_numbers = (3, 3)  # inclusive range of how many numbers a problem has
    c.number_range = (1, 20)  # inclusive range of each number
    c.target_range = (10, 99)  # inclusive range of the target
    c.min_solutions = 3  # every problem has at least this many distinct canonical solutions
    c.test_fraction = 0.2  # share of the problem space held out as the test split
    return c


def optimizer(learning_rate: float, warmup_steps: int) -> ml_collections.ConfigDict:
    """AdamW settings (jaxpost.train.OptimConfig fields; total_steps comes from the loop)."""
    c = ml_collections.ConfigDict()
    c.learning_rate = learning_rate  # peak AdamW learning rate
    c.warmup_steps = warmup_steps  # linear warmup, then cosine decay to end_lr_ratio · peak
    c.end_lr_ratio = 0.1
    c.weight_decay = 0.0
    c.clip_norm = 1.0  # global gradient-norm clip
    c.grad_accum = 1  # micro-batches per update
    return c


def sft_stage(steps: int = 300) -> ml_collections.ConfigDict:
    """Model, data, optimizer and loop of one SFT run (sft.py's run; grpo/opd's built-in init).

    With these defaults the "small" preset reaches pass@1 ≈ 0.2 on held-out Countdown problems in
    about three minutes on a 2-core CPU (see sft.py's docstring for a measured run).
    """
    c = ml_collections.ConfigDict()
    c.model = "small"  # a preset of jaxpost.models.PRESETS, or a local Hugging Face directory
    c.model_overrides = ""  # preset fields to replace, "d_model=96,n_layers=3" (presets only)
    c.tokenizer = "auto"  # "auto" (char for presets, the directory's own for HF), "char", or a dir
    c.dtype = ""  # "" keeps the preset's / checkpoint's dtype; "float32" or "bfloat16"
    c.init_seed = 0  # seed of a preset's random initialisation

    c.data = ml_collections.ConfigDict()
    c.data.train_problems = 1500  # Countdown training problems
    c.data.per_problem = 2  # solutions sampled (with replacement) per problem
    c.data.style = "all"  # solution slice: "all", "first" or "first_op:<op>" (countdown.sft_pairs)
    c.data.addition_problems = 0  # also train on this many addition problems (retention task)
    c.data.addition_digits = (2, 3)  # digits of each addition operand
    c.data.privileged_fraction = 0.0  # share of examples whose prompt shows the solution (OPSD)

    c.optim = optimizer(learning_rate=3e-3, warmup_steps=20)

    c.loop = ml_collections.ConfigDict()
    c.loop.steps = steps  # optimizer updates
    c.loop.batch_size = 64  # examples per update
    c.loop.checkpoint_every = 100  # orbax checkpoint interval (a rerun resumes from the last)
    c.loop.log_every = 10  # metrics.jsonl / progress-bar interval
    c.loop.progress = True  # tqdm progress bar on stderr
    return c


def evaluation() -> ml_collections.ConfigDict:
    """Held-out evaluation: n samples per test problem, verified; pass@k, coverage, ..."""
    c = ml_collections.ConfigDict()
    c.prompts = 64  # held-out Countdown test problems (0: no evaluation)
    c.samples = 64  # samples per problem (pass@k up to k = samples)
    c.max_new_tokens = 32  # completion budget (the longest reference completion is 31 tokens)
    c.temperature = 1.0  # sampling temperature of the evaluation
    c.addition_prompts = 0  # also evaluate on this many addition test problems (retention)
    c.seed = 1234  # sampling seed (the same for every model compared)
    return c
