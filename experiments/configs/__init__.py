"""The pieces every experiment config shares (big_vision style: Python modules, ConfigDicts).

Each main's config module (`sft.py`, `grpo.py`, `opd.py`, `paradigms.py`) defines
`get_config(arg=None)`; `--config=experiments/configs/sft.py:tiny` passes "tiny" as `arg`, and
`--config.a.b=value` overrides one field. Every main takes the same `shared()` fields:

    model, model_overrides, tokenizer, dtype, init_seed,  the student (a preset or an HF directory)
    remat                                                 and what its layers recompute
    teacher                                               a distillation teacher (an HF directory)
    task                                                  countdown | gsm8k | addition, its data
    mesh, loss_impl                                       devices and the loss path
    seed, workdir                                         the run

and the plain flags --model, --teacher, --task, --mesh, --workdir set the fields of those names.
Fields that may be "unset" are empty strings, never None: config_flags needs a typed default
to parse an override.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

VARIANTS_HELP = "'' (the default), 'tiny' (seconds: tests, smoke checks), 'pretrained' (a real checkpoint)"


def shared() -> ml_collections.ConfigDict:
    """The fields every main has (see the module docstring)."""
    c = ml_collections.ConfigDict()
    # required (--workdir=DIR): checkpoints/, metrics.jsonl, model/ (HF), eval.json, run_config.json
    c.workdir = ""
    c.seed = 0  # data order, sampling and every other random choice of the run
    c.model = "small"  # a preset of jaxpost.models.PRESETS, or a local Hugging Face directory
    c.model_overrides = ""  # preset fields to replace, "d_model=96,n_layers=3" (presets only)
    c.tokenizer = "auto"  # "auto": a directory's own tokenizer (char for presets), "char", a dir
    c.dtype = ""  # "" keeps the preset's / checkpoint's dtype; "float32" or "bfloat16"
    c.init_seed = 0  # seed of a preset's random initialisation
    c.remat = ""  # the student's layers: "" as the model says, none | full | dots | attn
    c.teacher = ""  # a distillation teacher, a Hugging Face directory ("" : the main's default)
    c.mesh = ""  # "2,2,2" (data,fsdp,tensor) or "fsdp=-1": shard over devices ("" one device)
    c.loss_impl = "auto"  # auto | materialized | fused_linear | xla | pallas_gpu | pallas_tpu
    # > 0: train low-rank adapters of this rank on the main's model (jaxpost.lora); checkpoints
    # hold the adapters, the saved model is merged. Built-in SFT stages train fully.
    c.lora_rank = 0
    c.lora_alpha = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    c.task = task()
    return c


def task() -> ml_collections.ConfigDict:
    """Which verifiable task, and where its data is."""
    c = ml_collections.ConfigDict()
    c.name = "countdown"  # countdown (generated), gsm8k (files), addition (generated)
    c.countdown = countdown()
    c.data_dir = ""  # gsm8k: a directory with train.jsonl and test.jsonl in the GSM8K format
    c.tfds_data_dir = ""  # gsm8k: a prepared TFDS data_dir holding gsm8k (nothing is downloaded)
    c.addition_digits = (2, 3)  # addition: digits of each operand (also the retention task)
    return c


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
    c.clip_norm = 1.0  # global gradient-norm clip (0: off)
    c.grad_accum = 1  # micro-batches per update
    return c


def loop(steps: int, batch_size: int, checkpoint_every: int, log_every: int
         ) -> ml_collections.ConfigDict:  # fmt: skip
    """How long a loop runs (jaxpost.loops.LoopConfig fields)."""
    c = ml_collections.ConfigDict()
    c.steps = steps  # optimizer updates (on-policy: rollout rounds)
    c.batch_size = batch_size  # examples (SFT) or prompts (on-policy) per update
    c.checkpoint_every = checkpoint_every  # orbax checkpoint interval (a rerun resumes from it)
    c.log_every = log_every  # metrics.jsonl / progress-bar interval
    c.progress = True  # tqdm progress bar on stderr
    # divergence (jaxpost.runner.DivergenceWatch): the run stops with status 3, no model saved
    c.max_skipped_streak = 10  # consecutive steps skipped for a non-finite loss/gradient (0: off)
    c.max_skipped_share = 0.5  # or more than this share of the last 100 steps skipped
    c.loss_explode = 1e4  # or a loss above this many times max(1, |first loss|) (0: off)
    c.max_param_growth = 100.0  # or parameters whose norm grew 100 x, checked at saves (0: off)
    return c


def sampling(group_size: int, max_new_tokens: int = 32) -> ml_collections.ConfigDict:
    """How rollouts are sampled (jaxpost.rollouts.SamplingConfig fields)."""
    c = ml_collections.ConfigDict()
    c.group_size = group_size  # samples per prompt (GRPO group / OPD rollouts per prompt)
    c.max_new_tokens = max_new_tokens  # completion budget
    c.temperature = 1.0  # rollout temperature
    c.top_k = 0  # 0: off
    c.top_p = 1.0  # 1.0: off
    return c


def sft_data(train_problems: int = 1500, per_problem: int = 2) -> ml_collections.ConfigDict:
    """What an SFT stage trains on (`jaxpost.inputs.sft_mixture`)."""
    c = ml_collections.ConfigDict()
    c.train_problems = train_problems  # training problems of the task
    c.per_problem = per_problem  # reference solutions sampled (with replacement) per problem
    c.style = "all"  # solution slice: "all", "first", "first_op:<op>" (task.styles)
    c.retention_share = 0.0  # addition examples (the retention task), as a share of the above
    c.privileged_share = 0.0  # prompts with a reference solution in context (OPSD's teacher)
    c.steering_share = 0.0  # steering-probe examples (Countdown's "first <op>" prompts)
    return c


def sft_stage(steps: int = 300) -> ml_collections.ConfigDict:
    """Data, optimizer and loop of one SFT run (sft.py's run; grpo/opd's built-in student).

    With these defaults the "small" preset reaches pass@1 ≈ 0.2 on held-out Countdown problems in
    about three minutes on a 2-core CPU (see sft.py's docstring for a measured run).
    """
    c = ml_collections.ConfigDict()
    c.data = sft_data()
    c.optim = optimizer(learning_rate=3e-3, warmup_steps=20)
    c.loop = loop(steps, batch_size=64, checkpoint_every=100, log_every=10)
    return c


def evaluation() -> ml_collections.ConfigDict:
    """Held-out evaluation: n samples per test problem, verified; pass@k, coverage, ..."""
    c = ml_collections.ConfigDict()
    c.prompts = 64  # held-out test problems of the task (0: no evaluation)
    c.samples = 64  # samples per problem (pass@k up to k = samples)
    c.max_new_tokens = 32  # completion budget (the longest reference Countdown completion: 31)
    c.temperature = 1.0  # sampling temperature of the evaluation
    c.addition_prompts = 0  # also evaluate on this many addition test problems (retention)
    c.seed = 1234  # sampling seed (the same for every model compared)
    return c


def with_variant(config: ml_collections.ConfigDict, arg: str | None,
                 variants: dict[str, Callable[[ml_collections.ConfigDict], None]]
                 ) -> ml_collections.ConfigDict:  # fmt: skip
    """Apply the variant `arg` names ("" or None: the config as it is)."""
    if not arg:
        return config
    if arg not in variants:
        raise ValueError(f"unknown config variant {arg!r}; choose from {', '.join(variants)}")
    variants[arg](config)
    return config


def tiny_eval(c: ml_collections.ConfigDict) -> None:
    """A seconds-scale evaluation."""
    c.prompts, c.samples, c.max_new_tokens = 4, 4, 32


def tiny_stage(c: ml_collections.ConfigDict, steps: int = 12) -> None:
    """A seconds-scale SFT stage (the tiny preset learns a little Countdown)."""
    c.data.train_problems = 48
    c.optim.warmup_steps = 2
    c.loop.steps, c.loop.batch_size, c.loop.checkpoint_every, c.loop.log_every = steps, 8, 0, 4
    c.loop.progress = False


def pretrained_eval(c: ml_collections.ConfigDict) -> None:
    """Longer completions and fewer samples: real checkpoints on GSM8K-sized problems."""
    c.prompts, c.samples, c.max_new_tokens = 64, 8, 256
