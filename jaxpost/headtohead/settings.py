"""The head-to-head's settings: validation, the arm list, and cache keys derived from them.

The settings are the ConfigDict of experiments/configs/paradigms.py. Nothing here lists which
fields matter: the cache keys hash whole subtrees of the config (plus a content fingerprint of
any checkpoint it names), minus the fields that cannot change a result (`_NEVER_MATTERS`), so a
field added to the config later is part of the keys without anyone remembering to add it.

    model_key   what the base and teacher depend on: everything but the arms' and the
                evaluation's settings
    arm_key     what an arm's training depends on: everything but the evaluation
    eval_key    what an arm's evaluation depends on: everything
"""

from __future__ import annotations

import hashlib
import json
import os

from jaxpost import importance, lora, teachers, train
from jaxpost.errors import UserError

# Fields that never change a result: where it goes, what is shown, which arms run this time.
_NEVER_MATTERS = ("workdir", "arms", "progress", "variant")


def pretrained(config) -> bool:
    """Whether the base is a Hugging Face checkpoint (else a preset trained here)."""
    from jaxpost import models

    return config.model not in models.PRESETS


def arm_processes(config) -> int:
    """How many arms train at once (`arm.processes`), each in its own process pinned to one CPU
    core (`parallel`); 1: one after the other in this process, on all its cores. 0 (auto): one
    per core this process may use, on a CPU backend with the built-in student (a checkpoint's
    arms, or a GPU's or TPU's, run in this process)."""
    n = config.arm.processes
    if n == 0:
        import jax

        if pretrained(config) or jax.default_backend() != "cpu":
            return 1
        return cpu_cores()
    return n


def cpu_cores() -> int:
    """The CPU cores this process may run on; 1 where a process cannot be pinned to a core
    (`os.sched_setaffinity` is Linux's), so arms run one after the other there."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else 1


def check(config) -> None:
    """Refuse settings the protocol cannot run, before any work, with the fix named (the arm
    list is checked against the table by `arms.arm_names`)."""
    a, b, e = config.arm, config.base, config.eval
    positive = {"arm.steps": a.steps, "arm.prompts_per_step": a.prompts_per_step,
                "arm.max_new_tokens": a.max_new_tokens, "arm.prefix_len": a.prefix_len,
                "base.train_problems": b.train_problems, "base.batch_size": b.batch_size,
                "eval.problems": e.problems, "eval.retention_problems": e.retention_problems,
                "eval.retention_samples": e.retention_samples,
                "eval.steer_problems": e.steer_problems, "eval.steer_samples": e.steer_samples,
                "eval.footprint_samples": e.footprint_samples,
                "arm.select_problems": a.select_problems, "arm.select_keep": a.select_keep,
                "arm.spectrum_outputs": a.spectrum_outputs, "eval.icl_examples": e.icl_examples,
                "arm.updates_per_batch": a.updates_per_batch}  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    if a.processes < 0:
        raise UserError(f"arm.processes must be >= 0 (0: one arm per CPU core, 1: one arm at a "
                        f"time in this process), got {a.processes}")  # fmt: skip
    if a.processes > 1:
        import jax

        cores = cpu_cores()
        if jax.default_backend() != "cpu":
            raise UserError(f"arm.processes={a.processes} runs arms on CPU cores; this backend "
                            f"is {jax.default_backend()}: set arm.processes=1")  # fmt: skip
        if a.processes > cores:
            raise UserError(f"arm.processes={a.processes} but this process may use {cores} CPU "
                            f"cores (one arm per core; pinning needs Linux): set it to at most "
                            f"{cores}, or 0 for one per core")  # fmt: skip
    if a.group_size < 2:
        raise UserError(f"arm.group_size must be >= 2 (GRPO needs a group), got {a.group_size}")
    if e.samples < 2:
        raise UserError(f"eval.samples must be >= 2 for pass@k curves, got {e.samples}")
    if not (b.learning_rate > 0 and a.learning_rate > 0 and a.select_learning_rate > 0):
        raise UserError("base.learning_rate, arm.learning_rate and arm.select_learning_rate must "
                        "be > 0")  # fmt: skip
    train.resolve_loss_impl(config.loss_impl)
    if a.select_rollouts < 2 or not (a.select_tau >= 0 and a.select_kl >= 0
                                     and a.select_epochs > 0):  # fmt: skip
        raise UserError(f"sparse_select needs arm.select_rollouts >= 2, arm.select_tau >= 0, "
                        f"arm.select_kl >= 0 and arm.select_epochs > 0; got {a.select_rollouts}, "
                        f"{a.select_tau}, {a.select_kl}, {a.select_epochs}")  # fmt: skip
    if not (a.sft_mild_lr_scale > 0 and a.sft_stress_lr_scale > 0 and a.degrade_noise >= 0):
        raise UserError(f"arm.sft_mild_lr_scale and arm.sft_stress_lr_scale must be > 0 and "
                        f"arm.degrade_noise >= 0; got {a.sft_mild_lr_scale}, "
                        f"{a.sft_stress_lr_scale}, {a.degrade_noise}")  # fmt: skip
    if not 0 <= a.ovd_threshold <= 10:
        raise UserError(f"arm.ovd_threshold must lie in [0, 10] (teacher scores 0-9), got "
                        f"{a.ovd_threshold}")  # fmt: skip
    if a.qsharp_top_k < 1 or not (a.qsharp_eta >= 0 and a.qsharp_learning_rate > 0):
        raise UserError(f"qsharp needs arm.qsharp_top_k >= 1, arm.qsharp_eta >= 0 and "
                        f"arm.qsharp_learning_rate > 0, got {a.qsharp_top_k}, {a.qsharp_eta} "
                        f"and {a.qsharp_learning_rate}")  # fmt: skip
    if not (0 <= a.gad_warmup_frac <= 1 and a.gad_disc_lr_scale > 0):
        raise UserError(f"arm.gad_warmup_frac must lie in [0, 1] (the share of arm.steps GAD "
                        f"warms up) and arm.gad_disc_lr_scale be > 0, got {a.gad_warmup_frac} "
                        f"and {a.gad_disc_lr_scale}")  # fmt: skip
    for field in ("dpg_alpha", "dpg_alpha_seek"):
        if not 0 <= a[field] < 1:
            raise UserError(f"arm.{field} must lie in [0, 1) (alpha-DPG: 0 forward KL, toward 1 "
                            f"reverse KL), got {a[field]}")  # fmt: skip
    if not 0 <= a.beta_rank <= 1:
        raise UserError(f"arm.beta_rank must lie in [0, 1], got {a.beta_rank}")
    try:
        lora.from_rank(config.lora_rank, config.lora_alpha)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad lora settings: {e}") from None
    if a.opsd_teacher not in teachers.SELF_TEACHERS or not 0 <= a.opsd_ema_decay < 1:
        raise UserError(f"arm.opsd_teacher must be frozen, live or ema and arm.opsd_ema_decay in "
                        f"[0, 1); got {a.opsd_teacher!r}, {a.opsd_ema_decay}")  # fmt: skip
    if a.opsd_teacher == "ema" and (config.lora_rank or config.mesh):
        raise UserError("arm.opsd_teacher=ema runs without lora_rank and without a mesh (not yet)")
    if not a.sampled_coef > 0:
        raise UserError(f"arm.sampled_coef must be > 0, got {a.sampled_coef}")
    if not (a.temperature > 0 and 0 < a.top_p <= 1):
        raise UserError(f"arm.temperature must be > 0 and arm.top_p in (0, 1], got "
                        f"{a.temperature} and {a.top_p}")  # fmt: skip
    try:
        importance.check(a.is_mode, None, a.is_max)
    except ValueError as e:
        raise UserError(f"arm.{e}") from None
    if pretrained(config):
        if config.variant != "pretrained":
            raise UserError(
                f"the base {config.model!r} is a checkpoint: run the pretrained defaults, "
                f"--config=experiments/configs/paradigms.py:pretrained (the built-in ones would "
                f"SFT it {b.steps} steps at lr {b.learning_rate})"
            )
        if b.steps < 0:
            raise UserError(f"base.steps must be >= 0, got {b.steps}")
    elif b.steps < 1 or config.teacher_steps < (0 if config.teacher else 1):
        raise UserError("the built-in base needs base.steps >= 1 and, without --teacher, "
                        "teacher_steps >= 1")  # fmt: skip
    if config.arm.fresh_problems < 0:
        raise UserError(f"arm.fresh_problems must be >= 0 (0: the base's problems), got "
                        f"{config.arm.fresh_problems}")  # fmt: skip
    if config.teacher_problems < 0:
        raise UserError(f"teacher_problems must be >= 0 (0: the base's problems), got "
                        f"{config.teacher_problems}")  # fmt: skip
    for name in ("model", "teacher"):
        path = config[name]
        if name == "model" and not pretrained(config):
            continue
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{name} directory not found or not a Hugging Face checkpoint (no "
                            f"config.json): {path}")  # fmt: skip


def checkpoint_fingerprint(path: str, sample: int = 1 << 20) -> str:
    """A hash of a checkpoint directory's contents: each file's name, size and its first and last
    `sample` bytes (all of a small file). It changes when the checkpoint is rewritten in place, so
    caches keyed on it are not reused, and not when the directory is copied or moved (unlike
    modification times); reading 2 MiB per file keeps it cheap for multi-GB weights."""
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if not entry.is_file():
            continue
        size = entry.stat().st_size
        digest.update(f"{entry.name}\0{size}\0".encode())
        with open(entry.path, "rb") as f:
            digest.update(f.read(sample))
            if size > 2 * sample:
                f.seek(size - sample)
                digest.update(f.read(sample))
            elif size > sample:
                digest.update(f.read())
    return digest.hexdigest()[:16]


# What an eval.json holds; raised when a field is added or changes meaning, so evaluations
# saved before are redone rather than read without it (2: per-problem `solution_counts`; 3:
# `diversity` is 1 - collision rate, the plug-in entropy `solution_entropy`).
EVALUATION_FORMAT = 3


def _key(config, leave_out: tuple[str, ...], **more) -> str:
    values = {k: v for k, v in config.to_dict().items() if k not in _NEVER_MATTERS + leave_out}
    values.update(more)
    if "arm" in values:  # how many arms run at once does not matter; whether each had one core
        values["arm"]["processes"] = "one core" if arm_processes(config) > 1 else "all cores"
    for name in ("model", "teacher"):  # a checkpoint rewritten at the same path is another one
        path = config[name]
        if path and os.path.isdir(path):
            values[f"{name}_files"] = checkpoint_fingerprint(path)
    blob = json.dumps(values, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def model_key(config) -> str:
    """The base and teacher's cache key (their directory under WORKDIR/models)."""
    return _key(config, ("arm", "eval", "loss_impl", "mesh", "remat", "plasticity"))


def arm_key(config) -> str:
    """An arm's training key (its directory's marker): a changed field retrains the arm."""
    return _key(config, ("eval",))


def eval_key(config) -> str:
    """An evaluation's cache key (eval.json): a changed field, or a new `EVALUATION_FORMAT`,
    re-evaluates."""
    return _key(config, (), evaluation_format=EVALUATION_FORMAT)
