"""The head-to-head protocol: one base model, one budget, every paradigm, one report.

    result = paradigms.run(paradigms.Settings(workdir="/tmp/jaxpost_paradigms"))

1. Models (cached in `workdir/models/`). The *base* student is SFT-trained on a mixture of the
   retention task (addition), a narrow slice of Countdown solutions (`base_style`, by default
   only solutions whose canonical chain opens with "+", so most valid solutions are unlikely
   under it), steering prompts and privileged-context prompts (so it can read a reference
   solution, which OPSD needs). The *teacher* is the base trained longer on the same mixture
   with the full Countdown solution distribution.
2. Arms (`workdir/arms/<arm>/`), each starting from the base with the same budget: `arm_steps`
   updates over `prompts_per_step × group_size` sequences each (SFT trains on that many dataset
   sequences; the on-policy arms sample that many).
3. Evaluation of base, teacher and every arm on held-out problems (`eval_samples` per problem at
   temperature 1): pass@k / CoT-pass@k curves, coverage and support change against the base,
   solution-set coverage, diversity, retention (addition), steerability, state locality, rank
   bias, KL from the base, supervision efficiency, with bootstrap 95% CIs over problems.
4. `report.write_report`: report.md, metrics.json and the plots; the literature's claims are
   judged by paired bootstrap CIs over problems computed in this run.

Interrupted runs pick up where they stopped: cached models, arms with an `eval.json` and an arm's
latest checkpoint are reused.

Scale. `Settings(model=DIR)` starts from a pretrained Hugging Face checkpoint (its tokenizer
beside it) instead of the built-in character-level base, `teacher=DIR` names the OPD teacher
(same tokenizer and vocabulary; otherwise the teacher is the base SFT-trained `teacher_steps`
more), `task="gsm8k"` (with `gsm8k_dir` or `tfds_data_dir`) runs the protocol on GSM8K, `mesh`
shards every arm's state, batches and rollouts over the devices (`jaxpost.sharding`) and
`loss_impl` sends the OPD losses through the fused Pallas kernels. The protocol is the same; on
GSM8K, diversity counts distinct reasoning paths (`gsm8k.reasoning_path`) since every problem
has one answer, and steerability (a Countdown probe) is not measured.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import (
    data,
    evaluate,
    loops,
    losses,
    metrics,
    models,
    report,
    sharding,
    tokenizers,
    train,
)
from jaxpost.metrics_log import read_metrics
from jaxpost.models import ModelConfig, hf
from jaxpost.tasks import addition, countdown, gsm8k, steer
from jaxpost.tokenizers import CharTokenizer

ARMS = ("sft", "grpo", "grpo_unlikely", "opd_fkl", "opd_jsd", "opd_rkl", "opd_entropy",
        "opd_prefix", "opsd")  # fmt: skip
ARM_HELP = {
    "sft": "SFT on dataset solutions drawn from the full solution set",
    "grpo": "GRPO with the verifier's 0/1 reward",
    "grpo_unlikely": "GRPO with He et al.'s unlikeliness reward (rank by base-policy logprob)",
    "opd_fkl": "OPD, forward KL(p_T || p_S) (alpha=0)",
    "opd_jsd": "OPD, generalized JSD (alpha=0.5)",
    "opd_rkl": "OPD, reverse KL(p_S || p_T) (alpha=1)",
    "opd_entropy": "entropy-aware OPD (reverse KL, forward KL where the teacher is uncertain)",
    "opd_prefix": "prefix OPD (reverse KL on the first prefix_len completion tokens)",
    "opsd": "OPSD: teacher = frozen base seeing a reference solution in its prompt",
}
RADAR_AXES = ("pass@1", "pass@large_k", "diversity", "retention", "steerability", "efficiency")
TASKS = ("countdown", "gsm8k")
# Defaults that depend on where the base comes from (a field left at None takes these): the
# built-in character-level student trains from scratch; a pretrained checkpoint is used as it is
# and fine-tuned at the small learning rates full fine-tuning of a real model needs.
BUILT_IN_DEFAULTS = {"base_steps": 800, "pretrain_lr": 3e-3, "arm_lr": 1e-4}
PRETRAINED_DEFAULTS = {"base_steps": 0, "pretrain_lr": 1e-5, "arm_lr": 1e-6}
NEW_TOKENS = {"countdown": 32, "gsm8k": 256}


class InputError(ValueError):
    """A problem with the inputs a run names, found once it loads them (checkpoints, tokenizers,
    data files, vocabularies, prompt lengths, the mesh). Programs report it without a traceback;
    any other ValueError is a bug and keeps its traceback."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run. Defaults finish in about ten minutes on a 2-core CPU.

    Fields left at None take `BUILT_IN_DEFAULTS` / `PRETRAINED_DEFAULTS` (by whether `model` is
    set) or `NEW_TOKENS[task]`; after construction they hold the resolved values.
    """

    workdir: str
    arms: tuple[str, ...] = ARMS
    seed: int = 0
    task: str = "countdown"
    # GSM8K: a directory with train.jsonl / test.jsonl in the GSM8K format, or a prepared TFDS dir
    gsm8k_dir: str = ""
    tfds_data_dir: str = ""
    # a pretrained base / teacher (Hugging Face directories, tokenizer beside the weights)
    model: str = ""
    teacher: str = ""
    dtype: str = ""  # load checkpoints in this dtype ("bfloat16"); "" keeps the checkpoint's
    mesh: str = ""  # e.g. "1,8,1" or "fsdp=4,tensor=2": shard the arms over the local devices
    loss_impl: str = ""  # a `kernels.IMPLS` name: the OPD losses run through the fused kernel
    # Countdown: three numbers in number_range, targets with >= min_solutions solutions.
    number_range: tuple[int, int] = (1, 12)
    target_range: tuple[int, int] = (10, 60)
    min_solutions: int = 2
    train_problems: int = 600
    base_style: str = "first_op:+"
    addition_digits: tuple[int, int] = (2, 2)
    # the built-in student architecture (the "small" preset with these fields replaced)
    d_model: int = 96
    n_layers: int = 3
    head_dim: int = 24
    mlp_dim: int = 256
    # base and teacher SFT
    pretrain_batch: int = 64
    pretrain_lr: float | None = None
    base_steps: int | None = None
    teacher_steps: int = 300
    # the arms' common budget
    arm_steps: int = 30
    prompts_per_step: int = 8
    group_size: int = 8
    arm_lr: float | None = None
    max_new_tokens: int | None = None
    beta_rank: float = 0.25
    prefix_len: int = 8
    # evaluation
    eval_problems: int = 48
    eval_samples: int = 64
    retention_problems: int = 64
    retention_samples: int = 4
    steer_problems: int = 32
    steer_samples: int = 16
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        defaults = PRETRAINED_DEFAULTS if self.model else BUILT_IN_DEFAULTS
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", NEW_TOKENS[self.task])
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms repeat: {self.arms}")
        for name in ("train_problems", "arm_steps", "prompts_per_step", "eval_problems",
                     "retention_problems", "steer_problems", "retention_samples",
                     "steer_samples", "pretrain_batch", "max_new_tokens", "prefix_len"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.base_steps < (0 if self.model else 1):
            raise ValueError(f"base_steps must be >= {0 if self.model else 1}, got "
                             f"{self.base_steps}")  # fmt: skip
        if self.teacher_steps < (0 if self.teacher else 1):
            raise ValueError(f"teacher_steps must be >= 1 without a --teacher, got "
                             f"{self.teacher_steps}")  # fmt: skip
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO needs a group), got {self.group_size}")
        if self.eval_samples < 2:
            raise ValueError(f"eval_samples must be >= 2 for pass@k curves, got {self.eval_samples}")
        if not (self.pretrain_lr > 0 and self.arm_lr > 0):
            raise ValueError("learning rates must be > 0")
        countdown.select_solutions([], self.base_style)  # raises on an unknown style
        for name in ("model", "teacher"):
            path = getattr(self, name)
            if path and not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"{name} directory not found or not a Hugging Face checkpoint "
                                 f"(no config.json): {path}")  # fmt: skip
        if self.task == "gsm8k":
            if not self.model:
                raise ValueError("task gsm8k needs a pretrained --model=DIR (the built-in base is "
                                 "a character-level Countdown model)")  # fmt: skip
            if bool(self.gsm8k_dir) == bool(self.tfds_data_dir):
                raise ValueError("task gsm8k needs exactly one of gsm8k_dir (train.jsonl and "
                                 "test.jsonl) or tfds_data_dir (a prepared TFDS gsm8k)")  # fmt: skip
            for split in ("train", "test"):
                path = os.path.join(self.gsm8k_dir, f"{split}.jsonl")
                if self.gsm8k_dir and not os.path.isfile(path):
                    raise ValueError(f"GSM8K file not found: {path}")
        if self.dtype and self.dtype not in hf.DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(hf.DTYPES)}")
        if self.mesh:
            sharding.parse_mesh_shape(self.mesh)  # raises on a malformed shape
        if self.loss_impl:
            import kernels

            if self.loss_impl not in kernels.IMPLS:
                raise ValueError(f"unknown loss_impl {self.loss_impl!r}; choose from "
                                 f"{', '.join(kernels.IMPLS)}")  # fmt: skip

    @property
    def pretrained(self) -> bool:
        return bool(self.model)

    def model_key(self) -> str:
        """Hash of the fields the base and teacher depend on (the model cache's key)."""
        fields = ("seed", "task", "gsm8k_dir", "tfds_data_dir", "model", "teacher", "dtype",
                  "number_range", "target_range", "min_solutions", "train_problems",
                  "base_style", "addition_digits", "d_model", "n_layers", "head_dim", "mlp_dim",
                  "pretrain_batch", "pretrain_lr", "base_steps", "teacher_steps")  # fmt: skip
        values = {f: getattr(self, f) for f in fields}
        if not self.model:  # keep the built-in protocol's cache key as it was
            values = {f: v for f, v in values.items()
                      if f not in ("task", "gsm8k_dir", "tfds_data_dir", "model", "teacher",
                                   "dtype")}  # fmt: skip
        else:  # a checkpoint rewritten at the same path is a different base
            values["model_files"] = checkpoint_fingerprint(self.model)
        blob = json.dumps(values, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def arm_key(self) -> str:
        """Hash of everything an arm's result depends on (checkpoints by their files, too)."""
        values = dataclasses.asdict(self) | {"workdir": "", "arms": [], "progress": 0}
        for name in ("model", "teacher"):
            if getattr(self, name):
                values[f"{name}_files"] = checkpoint_fingerprint(getattr(self, name))
        blob = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


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


def miniature(workdir: str, **overrides) -> Settings:
    """A seconds-scale protocol (for tests): every arm, tiny budgets, few prompts."""
    small = dict(train_problems=40, d_model=32, n_layers=1, head_dim=16, mlp_dim=64,
                 pretrain_batch=16, base_steps=6, teacher_steps=4, arm_steps=2,
                 prompts_per_step=2, group_size=2, max_new_tokens=24, eval_problems=4,
                 eval_samples=4, retention_problems=4, retention_samples=2, steer_problems=3,
                 steer_samples=2, progress=False)  # fmt: skip
    if overrides.get("model"):  # a checkpoint base is used as it is unless asked otherwise
        del small["base_steps"]
    return Settings(workdir=workdir, **(small | overrides))


# ---------------------------------------------------------------------------------------------
# tasks, data, models


@dataclasses.dataclass
class _World:
    """The tasks, tokenizer and problem sets shared by every stage of a run."""

    settings: Settings
    tok: tokenizers.Tokenizer
    task: countdown.Countdown | gsm8k.GSM8K
    add: addition.Addition
    steer: steer.Steer | None  # the steering probe (Countdown only)
    train: list
    test: list
    add_test: list
    steer_test: list
    mesh: jax.sharding.Mesh | None = None


def _task(s: Settings):
    if s.task == "countdown":
        return countdown.Countdown(num_numbers=(3, 3), number_range=s.number_range,
                                   target_range=s.target_range, min_solutions=s.min_solutions)  # fmt: skip
    try:  # the files a user named: unreadable or malformed data is an input error
        if s.gsm8k_dir:
            return gsm8k.GSM8K.from_jsonl(os.path.join(s.gsm8k_dir, "train.jsonl"),
                                          os.path.join(s.gsm8k_dir, "test.jsonl"))  # fmt: skip
        return gsm8k.GSM8K.from_tfds(s.tfds_data_dir)
    except (ValueError, OSError) as e:
        raise InputError(f"loading GSM8K: {e}") from e


def _mesh(s: Settings):
    if not s.mesh:
        return None
    try:
        return sharding.make_mesh(s.mesh)
    except ValueError as e:
        raise InputError(f"mesh {s.mesh!r} on {jax.device_count()} devices: {e}") from None


def _world(s: Settings, tok: tokenizers.Tokenizer) -> _World:
    task = _task(s)
    add = addition.Addition(digits=s.addition_digits)
    st = steer.Steer(countdown=task) if isinstance(task, countdown.Countdown) else None
    try:
        train_set, test_set = task.prompts("train", s.train_problems, s.seed), task.prompts(
            "test", s.eval_problems, s.seed)  # fmt: skip
    except ValueError as e:
        raise InputError(f"{task.name}: {e}") from None
    return _World(
        settings=s, tok=tok, task=task, add=add, steer=st, train=train_set, test=test_set,
        add_test=add.prompts("test", s.retention_problems, s.seed),
        steer_test=st.prompts("test", s.steer_problems, s.seed) if st else [],
        mesh=_mesh(s),
    )  # fmt: skip


def _task_pairs(w: _World, style: str, per_problem: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) texts of reference solutions of the training problems."""
    if isinstance(w.task, countdown.Countdown):
        return countdown.sft_pairs(w.task, w.train, style=style, per_problem=per_problem,
                                   seed=seed)  # fmt: skip
    return [(w.task.render_prompt(p), w.task.render_completion(p, p.answer)) for p in w.train]


def _privileged_pair(w: _World, problem, rng: np.random.Generator) -> tuple[str, str]:
    """(teacher prompt with a reference solution in context, that solution's completion)."""
    if isinstance(w.task, countdown.Countdown):
        sols = w.task.solutions(problem)
        solution = sols[int(rng.integers(len(sols)))]
        view = countdown.privileged_view(w.task, problem, solution)
        return view.teacher_prompt, w.task.render_completion(problem, solution)
    view = gsm8k.privileged_view(w.task, problem)
    return view.teacher_prompt, w.task.render_completion(problem, problem.answer)


def _mixture(w: _World, style: str, seed: int) -> list[tuple[str, str]]:
    """Task solutions of `style` plus addition, steering and privileged-context examples."""
    rng = np.random.default_rng([seed, 11])
    pairs = _task_pairs(w, style, 2, seed)
    n = max(len(pairs) // 2, 8)
    for p in w.add.prompts("train", n, seed):
        pairs.append((w.add.render_prompt(p), w.add.render_completion(p, w.add.solutions(p)[0])))
    if w.steer is not None:
        for p in w.steer.prompts("train", max(n // 2, 4), seed):
            sols = w.steer.compliant_solutions(p)
            pairs.append((w.steer.render_prompt(p),
                          w.steer.render_completion(p, sols[rng.integers(len(sols))])))  # fmt: skip
    for p in w.train[: max(n // 2, 4)]:
        pairs.append(_privileged_pair(w, p, rng))
    return pairs


def student_config(s: Settings) -> ModelConfig:
    """The built-in student (used when no pretrained `model` is given)."""
    return models.get_config("small", vocab_size=CharTokenizer.vocab_size, d_model=s.d_model,
                             n_layers=s.n_layers, head_dim=s.head_dim, mlp_dim=s.mlp_dim)  # fmt: skip


def _pretrain(w: _World, config, params, style: str, steps: int, desc: str, seed: int):
    s = w.settings
    examples = data.encode_pairs(w.tok, _mixture(w, style, seed))
    optim = train.OptimConfig(learning_rate=s.pretrain_lr, warmup_steps=min(20, steps),
                              total_steps=steps)  # fmt: skip
    loop = loops.LoopConfig(steps=steps, batch_size=s.pretrain_batch, seed=seed,
                            progress=s.progress, desc=desc)  # fmt: skip
    return loops.run_sft(config, params, examples, optim, loop, pad_id=w.tok.pad_id, mesh=w.mesh)


def _cached_model(path: str, build: Callable[[], tuple[ModelConfig, dict, list]], log,
                  tok: tokenizers.Tokenizer, dtype: str = ""):  # fmt: skip
    if os.path.exists(os.path.join(path, "config.json")):
        log(f"reusing {path}")
        config, params = hf.load_hf(path, dtype=dtype or None)
        with open(os.path.join(path, "history.json")) as f:
            return config, params, json.load(f)
    config, params, history = build()
    hf.save_hf(path, config, params)
    tokenizers.save_beside(path, tok)
    with open(os.path.join(path, "history.json"), "w") as f:
        json.dump(history, f)
    return config, params, history


@dataclasses.dataclass
class Models:
    """The base student and the teacher of a run (the teacher may have another architecture)."""

    config: ModelConfig
    base: dict
    teacher_config: ModelConfig
    teacher: dict
    history: dict  # {"base"/"teacher": SFT curve}, empty for a checkpoint used as it is
    describe: dict  # {"student"/"base"/"teacher": one line for the report}


def tokenizer_for(s: Settings) -> tokenizers.Tokenizer:
    """The built-in character tokenizer, or the one saved beside the pretrained `model`."""
    return _tokenizer_beside(s.model) if s.model else CharTokenizer()


def _tokenizer_beside(model_dir: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.from_model_dir(model_dir)
    except (ValueError, OSError) as e:
        raise InputError(f"tokenizer of {model_dir}: {e}") from None


def _check_teacher(s: Settings, tok, config: ModelConfig, teacher_config: ModelConfig) -> None:
    sample = "Question: 12 + 30 = ? Answer: 42\n"
    other = _tokenizer_beside(s.teacher)
    same = (other.vocab_size, other.eos_id, other.pad_id) == (tok.vocab_size, tok.eos_id,
                                                              tok.pad_id)  # fmt: skip
    if teacher_config.vocab_size != config.vocab_size or not same or (
            other.encode(sample) != tok.encode(sample)):  # fmt: skip
        raise InputError(
            f"teacher {s.teacher} (vocab {teacher_config.vocab_size}) and student "
            f"{s.model or 'built-in'} (vocab {config.vocab_size}) must share one tokenizer and "
            f"vocabulary for token-level distillation"
        )


def base_and_teacher(w: _World, log=print) -> Models:
    """The base and teacher, trained once per model_key (or loaded from the given checkpoints)."""
    s = w.settings
    root = os.path.join(s.workdir, "models", s.model_key())
    if s.model:
        config, start = hf.load_hf(s.model, dtype=s.dtype or None)
        if w.tok.vocab_size > config.vocab_size:
            raise InputError(f"vocabulary mismatch: the tokenizer in {s.model} has "
                             f"{w.tok.vocab_size} ids but the model's embedding table has "
                             f"{config.vocab_size} rows")  # fmt: skip
        origin = f"{s.model} ({config.family})"
    else:
        config = student_config(s)
        start = models.init(config, seed=s.seed)
        origin = f"built-in {config.family}-style decoder"

    def build_base():
        r = _pretrain(w, config, start, s.base_style, s.base_steps,
                      "base (SFT, narrow slice)", s.seed)  # fmt: skip
        return config, r.state.params, r.history

    if s.base_steps > 0:
        config, base, base_hist = _cached_model(os.path.join(root, "base"), build_base, log, w.tok,
                                                s.dtype)  # fmt: skip
    else:
        base, base_hist = start, []
    if s.teacher:
        t_config, teacher = hf.load_hf(s.teacher, dtype=s.dtype or None)
        _check_teacher(s, w.tok, config, t_config)
        teacher_hist, teacher_line = [], f"{s.teacher} ({t_config.num_params():,} parameters)"
    else:

        def build_teacher():
            r = _pretrain(w, config, base, "all", s.teacher_steps, "teacher (SFT, all solutions)",
                          s.seed + 1)  # fmt: skip
            return config, r.state.params, r.history

        t_config, teacher, teacher_hist = _cached_model(os.path.join(root, "teacher"),
                                                        build_teacher, log, w.tok, s.dtype)  # fmt: skip
        teacher_line = f"the base trained {s.teacher_steps} more steps with all solutions"
    if w.mesh is not None:  # every model lives on the mesh, so loops and sampling agree on devices
        base = sharding.shard_params(base, sharding.param_shardings(config, w.mesh))
        teacher = sharding.shard_params(teacher, sharding.param_shardings(t_config, w.mesh))
    slice_ = (f"Countdown slice '{s.base_style}'" if s.task == "countdown" else "GSM8K train")
    base_line = (f"SFT {s.base_steps} steps × {s.pretrain_batch} on {slice_} + addition"
                 + (" + steering" if w.steer else "") + " + privileged-context examples")
    if s.base_steps == 0:
        base_line = f"the checkpoint {s.model} as it is"
    return Models(
        config=config, base=base, teacher_config=t_config, teacher=teacher,
        history={"base": base_hist, "teacher": teacher_hist},
        describe={"student": f"{origin}, d_model={config.d_model}, {config.n_layers} layers "
                             f"({config.num_params():,} parameters)",
                  "base": base_line, "teacher": teacher_line},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# arms


def _reward(w: _World):
    def reward(i: int, completion: Sequence[int]) -> float:
        return float(w.task.verify_answer(w.train[i], w.tok.decode(completion)))

    return reward


def _encode(w: _World, texts: Sequence[str], what: str, config: ModelConfig) -> list[list[int]]:
    """Token ids of prompts, checked to leave room for max_new_tokens in the model's context."""
    ids = [w.tok.encode(t, add_bos=True) for t in texts]
    longest = max(len(x) for x in ids)
    need = data.round_up(longest, 16) + w.settings.max_new_tokens
    if need > config.max_seq_len:
        raise InputError(
            f"{what}: the longest prompt ({longest} tokens, padded to "
            f"{data.round_up(longest, 16)}) plus max_new_tokens={w.settings.max_new_tokens} is "
            f"{need} tokens, more than the model's max_seq_len {config.max_seq_len}"
        )
    return ids


def run_arm(w: _World, arm: str, m: Models) -> loops.RunResult:
    """Train one arm from the base with the shared budget; resumes from its checkpoints."""
    s = w.settings
    rows = s.prompts_per_step * s.group_size
    optim = train.OptimConfig(learning_rate=s.arm_lr, warmup_steps=min(5, s.arm_steps),
                              total_steps=s.arm_steps)  # fmt: skip
    loop = loops.LoopConfig(
        steps=s.arm_steps, batch_size=s.prompts_per_step, group_size=s.group_size,
        max_new_tokens=s.max_new_tokens, seed=s.seed + 100, progress=s.progress, desc=arm,
        workdir=os.path.join(s.workdir, "arms", arm), checkpoint_every=max(1, s.arm_steps // 3),
    )  # fmt: skip
    prompts = _encode(w, [w.task.render_prompt(p) for p in w.train], "training prompts", m.config)
    source = loops.PromptSource(prompts=prompts, reward=_reward(w), eos_id=w.tok.eos_id,
                                pad_id=w.tok.pad_id)  # fmt: skip
    if arm == "sft":
        pairs = _task_pairs(w, "all", 4, s.seed + 7)
        sft_loop = dataclasses.replace(loop, batch_size=rows)
        return loops.run_sft(m.config, m.base, data.encode_pairs(w.tok, pairs), optim, sft_loop,
                             pad_id=w.tok.pad_id, mesh=w.mesh)  # fmt: skip
    if arm in ("grpo", "grpo_unlikely"):
        transform = None
        if arm == "grpo_unlikely":
            def transform(r, seq_logp):
                return np.asarray(losses.unlikeliness_rewards(
                    jnp.asarray(r), jnp.asarray(seq_logp), s.group_size, beta_rank=s.beta_rank))
        return loops.run_grpo(m.config, m.base, source, optim, loop, reward_transform=transform,
                              mesh=w.mesh)  # fmt: skip
    impl = s.loss_impl or None
    if arm == "opsd":
        rng = np.random.default_rng([s.seed, 23])
        views = [_privileged_pair(w, p, rng)[0] for p in w.train]
        source = dataclasses.replace(
            source, teacher_prompts=_encode(w, views, "OPSD teacher prompts", m.config))
        return loops.run_opd(m.config, m.base, m.config, m.base, source,
                             losses.opd_kl(1.0, impl=impl), optim, loop, mesh=w.mesh)  # fmt: skip
    loss_fn = {
        "opd_fkl": lambda: losses.opd_kl(0.0, impl=impl),
        "opd_jsd": lambda: losses.opd_kl(0.5, impl=impl),
        "opd_rkl": lambda: losses.opd_kl(1.0, impl=impl),
        "opd_entropy": lambda: losses.entropy_aware_opd_kl(),
        "opd_prefix": lambda: losses.prefix_opd(losses.opd_kl(1.0, impl=impl), s.prefix_len),
    }[arm]()
    return loops.run_opd(m.config, m.base, m.teacher_config, m.teacher, source, loss_fn, optim,
                         loop, mesh=w.mesh)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# evaluation


@functools.cache
def _forced_logprobs_fn(config: ModelConfig):
    # One jitted function per config, so every model and arm reuses its compiled programs.
    return jax.jit(functools.partial(loops.teacher_forced_logprobs, config))


def _forced_logprobs(config, params, prompts, tokens, mask, pad_id, chunk=1024) -> np.ndarray:
    """Per-token logprobs [N, M] of fixed completions under a model (teacher forcing)."""
    fn = _forced_logprobs_fn(config)
    width = data.round_up(max(len(x) for x in prompts), 16)
    out = []
    for i in range(0, len(prompts), chunk):
        pt, pm = data.left_pad(prompts[i : i + chunk], width, pad_id)
        batch = {"prompt_tokens": pt, "prompt_mask": pm, "completion": tokens[i : i + chunk],
                 "completion_mask": mask[i : i + chunk]}  # fmt: skip
        out.append(np.asarray(fn(params, jax.tree.map(jnp.asarray, batch))))
    return np.concatenate(out) * mask


def _rows(samples: evaluate.Samples) -> list[list[int]]:
    return [p for p in samples.prompts for _ in range(samples.n)]


def _batch_nll(config, params, batch: dict, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token logprobs and mask of the targets of a training batch (SFT or prompt/completion)."""
    if "completion" in batch:
        prompts = [r[m.astype(bool)].tolist() for r, m in zip(batch["prompt_tokens"],
                                                              batch["prompt_mask"])]  # fmt: skip
        mask = np.asarray(batch["completion_mask"])
        return _forced_logprobs(config, params, prompts, np.asarray(batch["completion"]), mask,
                                pad_id), mask  # fmt: skip
    logits = models.apply(config, params, jnp.asarray(batch["tokens"]),
                          jnp.asarray(batch["attention_mask"]))  # fmt: skip
    logp = np.asarray(losses.token_logprobs(logits[:, :-1], jnp.asarray(batch["tokens"][:, 1:])))
    mask = np.asarray(batch["loss_mask"][:, 1:])
    return logp * mask, mask


@dataclasses.dataclass
class Evaluation:
    """One model's evaluation: JSON-able summary plus the per-problem values claims pair on."""

    curves: dict
    scalars: dict
    per_problem: dict
    samples: evaluate.Samples | None = None

    def to_json(self) -> dict:
        return {"curves": self.curves, "scalars": self.scalars, "per_problem": self.per_problem}


def _est(values) -> dict:
    return metrics.mean_ci(np.asarray(values, float)).as_dict()


def _paths(w: _World, samples: evaluate.Samples) -> list[list]:
    """Per sample, the identity diversity counts (None for a wrong one): the canonical solution
    on Countdown, the reasoning path on GSM8K (whose problems have one answer each)."""
    if isinstance(w.task, countdown.Countdown):
        return samples.canonical
    return [[gsm8k.reasoning_path(t) if ok else None for t, ok in zip(row, oks)]
            for row, oks in zip(samples.texts, samples.answer_ok)]  # fmt: skip


def evaluate_model(w: _World, config, params, *, base: Evaluation | None = None,
                   base_params=None, base_config=None, seed: int = 0) -> Evaluation:  # fmt: skip
    """Every metric of the report for one model (the base's evaluation pairs with the others)."""
    s = w.settings
    main = evaluate.sample(config, params, w.tok, w.task, w.test, n=s.eval_samples,
                           max_new_tokens=s.max_new_tokens, seed=seed, mesh=w.mesh)  # fmt: skip
    summary = evaluate.summarize(main)
    n = s.eval_samples
    correct = main.answer_ok
    paths = _paths(w, main)
    per_problem = {
        "pass@1": metrics.pass_at_k(n, correct.sum(1), 1).tolist(),
        "pass@large_k": metrics.pass_at_k(n, correct.sum(1), n).tolist(),
        "num_correct": correct.sum(1).tolist(),
        "diversity": [metrics.solution_entropy(row) for row in paths],
    }
    scalars = dict(summary["scalars"])
    scalars["pass@large_k"] = scalars.pop(f"pass@{n}")
    scalars["diversity"] = _est(per_problem["diversity"])
    scalars["collision_rate"] = _est([metrics.collision_rate(r) for r in paths])
    scalars["solution_set_coverage"] = _est(metrics.solution_set_coverage(
        main.canonical, [w.task.solutions(p) for p in w.test]))  # fmt: skip

    add = evaluate.sample(config, params, w.tok, w.add, w.add_test, n=s.retention_samples,
                          max_new_tokens=40, seed=seed + 1, mesh=w.mesh)  # fmt: skip
    per_problem["retention"] = add.answer_ok.mean(1).tolist()
    scalars["retention"] = _est(per_problem["retention"])

    if w.steer is not None:
        st = evaluate.sample(config, params, w.tok, w.steer, w.steer_test, n=s.steer_samples,
                             max_new_tokens=s.max_new_tokens, seed=seed + 2, mesh=w.mesh)  # fmt: skip
        comply = [[w.steer.complies(p, t) for t in row] for p, row in zip(w.steer_test, st.texts)]
        per_problem["steerability"] = np.mean(comply, axis=1).tolist()
        scalars["steerability"] = _est(per_problem["steerability"])
        scalars["steer_tv"] = _est([
            metrics.steer_distance([w.steer.compliant_canonical(p, t) for t in row],
                                   w.steer.requested_distribution(p))["tv"]
            for p, row in zip(w.steer_test, st.texts)
        ])  # fmt: skip

    if base is not None and base_params is not None:
        base_config = base_config or config
        scalars.update({f"support_{k}": {"mean": v} for k, v in metrics.support_change(
            np.asarray(base.per_problem["num_correct"]), correct.sum(1)).items()})  # fmt: skip
        # rank bias: base logprob of this model's correct samples against its change
        rows = _rows(main)
        base_lp = _forced_logprobs(base_config, base_params, rows, main.tokens, main.mask,
                                   w.tok.pad_id).sum(1)  # fmt: skip
        ok = correct.reshape(-1)
        groups = np.repeat(np.arange(len(w.test)), n)
        rb = metrics.rank_bias(base_lp[ok], main.seq_logprob.reshape(-1)[ok], groups[ok])
        scalars["rank_bias"] = {"mean": rb}
        # KL(base || model) on the base's own samples
        bs = base.samples
        lp = _forced_logprobs(config, params, _rows(bs), bs.tokens, bs.mask, w.tok.pad_id)
        scalars["kl_from_base"] = metrics.sequence_kl(bs.logprobs * bs.mask, lp, bs.mask).as_dict()
    return Evaluation(summary["curves"], scalars, per_problem, main)


def _paired(a, b) -> metrics.Estimate:
    """Mean of a - b over problems where both are defined, with a bootstrap CI."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return metrics.mean_ci(a[ok] - b[ok])


def _verdict(est: metrics.Estimate, expect_positive: bool = True) -> str:
    lo, hi = (est.lo, est.hi) if expect_positive else (-est.hi, -est.lo)
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "not reproduced"
    return "inconclusive"


def _e(est: metrics.Estimate) -> str:
    return f"{est.mean:+.3f} [{est.lo:+.3f}, {est.hi:+.3f}]"


def claims(evals: dict[str, Evaluation]) -> list[dict]:
    """The literature's claims this setup can test, judged by paired 95% CIs over problems.

    "reproduced": the CI of the predicted difference excludes 0 in the predicted direction;
    "not reproduced": it excludes 0 in the other direction; otherwise "inconclusive".
    """
    out = []
    pp = {k: v.per_problem for k, v in evals.items()}
    if "grpo" in pp:
        gain1 = _paired(pp["grpo"]["pass@1"], pp["base"]["pass@1"])
        over = _paired(pp["base"]["pass@large_k"], pp["grpo"]["pass@large_k"])
        verdict = _verdict(over)
        if verdict == "reproduced" and gain1.lo <= 0:
            verdict = "inconclusive"  # a crossover needs GRPO ahead at k=1 first
        out.append({
            "claim": "RLVR (GRPO) beats the base at pass@1 but the base overtakes it at large k",
            "source": "Yue et al. 2025", "verdict": verdict,
            "evidence": f"pass@1 GRPO−base {_e(gain1)}; pass@large_k base−GRPO {_e(over)}",
        })  # fmt: skip
    if "grpo" in pp and "grpo_unlikely" in pp:
        d = _paired(pp["grpo_unlikely"]["pass@large_k"], pp["grpo"]["pass@large_k"])
        out.append({"claim": "the unlikeliness reward raises pass@large_k over GRPO",
                    "source": "He, Fried & Welleck 2025", "verdict": _verdict(d),
                    "evidence": f"pass@large_k unlikely−GRPO {_e(d)}"})  # fmt: skip
    on_policy = [a for a in ("grpo", "opd_rkl", "opd_jsd", "opd_fkl", "opsd") if a in pp]
    if "sft" in pp and on_policy:
        ret = np.mean([pp[a]["retention"] for a in on_policy], axis=0)
        d = _paired(ret, pp["sft"]["retention"])
        gains = ", ".join(
            f"{a} {_e(_paired(pp[a]['pass@1'], pp['base']['pass@1']))}" for a in ["sft", *on_policy]
        )
        out.append({"claim": "on-policy methods retain more of the earlier skill than SFT",
                    "source": "Shenfeld et al. 2025; Chen et al. 2025 (RL's razor / retention)",
                    "verdict": _verdict(d),
                    "evidence": f"addition accuracy, mean of {'/'.join(on_policy)} − SFT "
                                f"{_e(d)}; pass@1 gains: {gains}"})  # fmt: skip
    for arm, label in (("opd_rkl", "reverse-KL OPD"), ("opsd", "OPSD")):
        if arm in pp:
            d = _paired(pp[arm]["diversity"], pp["base"]["diversity"])
            out.append({"claim": f"{label} narrows diversity (solution entropy) below the base",
                        "source": "Agarwal et al. 2024 (GKD); mode-seeking reverse KL",
                        "verdict": _verdict(d, expect_positive=False),
                        "evidence": f"entropy {arm}−base {_e(d)} nats"})  # fmt: skip
    if "opd_entropy" in pp and "opd_rkl" in pp:
        d = _paired(pp["opd_entropy"]["diversity"], pp["opd_rkl"]["diversity"])
        out.append({"claim": "entropy-aware OPD keeps more diversity than reverse-KL OPD",
                    "source": "Jin et al. 2026", "verdict": _verdict(d),
                    "evidence": f"entropy entropy-aware−reverse-KL {_e(d)} nats"})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# the whole protocol


def _history(path: str) -> list[dict]:
    """An arm's training curve from its metrics.jsonl (a resumed run's replayed steps deduped)."""
    if not os.path.exists(os.path.join(path, "metrics.jsonl")):
        return []
    rows = {}
    for r in read_metrics(path):
        rows[r["step"]] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                           for k, v in r.items()}  # fmt: skip
    return [rows[k] for k in sorted(rows)]


def _load_eval(path: str, key: str) -> Evaluation | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("key") != key:
        return None
    return Evaluation(saved["curves"], saved["scalars"], saved["per_problem"])


def _save_eval(path: str, key: str, ev: Evaluation, extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, **ev.to_json(), **(extra or {})}, f, default=float)
    os.replace(tmp, path)


ARM_KEY_FILE = "arm_key"


def _claim_arm_dir(arm_dir: str, key: str, arm: str, log) -> None:
    """Make `arm_dir` hold only this run's training: checkpoints and curves another arm_key left
    there (other settings, e.g. a new learning rate) would otherwise be resumed as this run's.
    They are moved aside to `<arm_dir>.stale-<their key>`, not deleted."""
    marker = os.path.join(arm_dir, ARM_KEY_FILE)
    if os.path.isdir(arm_dir):
        old = None
        if os.path.exists(marker):
            with open(marker) as f:
                old = f.read().strip()
        if old == key:
            return  # the same run, interrupted: resume it
        stale = f"{arm_dir}.stale-{old or 'unmarked'}"
        log(f"{arm}: {arm_dir} holds a run with other settings; moved it to {stale} and "
            f"starting this arm over")  # fmt: skip
        if os.path.exists(stale):
            shutil.rmtree(stale)
        os.replace(arm_dir, stale)
    os.makedirs(arm_dir)
    with open(marker, "w") as f:
        f.write(key)


def run(s: Settings, log: Callable[[str], None] = print) -> dict:
    """Run the protocol (reusing whatever an earlier run of the same settings left) and write
    the report; returns the metrics dictionary the report was rendered from."""
    start = time.perf_counter()
    if jax.process_count() > 1:  # caches, reports and arm directories assume one writer
        raise InputError(f"the head-to-head runs in one process (a mesh over its local devices); "
                         f"this job has {jax.process_count()} processes")  # fmt: skip
    os.makedirs(s.workdir, exist_ok=True)
    w = _world(s, tokenizer_for(s))
    m = base_and_teacher(w, log)
    config, base = m.config, m.base
    for cfg in (m.config, m.teacher_config):  # both models sample the held-out prompts
        _encode(w, [w.task.render_prompt(p) for p in w.test], "evaluation prompts", cfg)
    log(f"models ready ({time.perf_counter() - start:.0f} s)")
    key = s.arm_key()
    evals: dict[str, Evaluation] = {}
    extras: dict[str, dict] = {}
    # the base is always evaluated in-process: other models' paired metrics need its samples
    log("evaluating base")
    evals["base"] = evaluate_model(w, config, base, seed=s.seed)
    log("evaluating teacher")
    evals["teacher"] = _load_eval(os.path.join(s.workdir, "models", "teacher_eval.json"), key)
    if evals["teacher"] is None:
        evals["teacher"] = evaluate_model(w, m.teacher_config, m.teacher, base=evals["base"],
                                          base_params=base, base_config=config, seed=s.seed)  # fmt: skip
        _save_eval(os.path.join(s.workdir, "models", "teacher_eval.json"), key, evals["teacher"])
    for arm in s.arms:
        arm_dir = os.path.join(s.workdir, "arms", arm)
        eval_path = os.path.join(arm_dir, "eval.json")
        cached = _load_eval(eval_path, key)
        if cached is not None:
            log(f"{arm}: reusing finished arm")
            evals[arm] = cached
            with open(eval_path) as f:
                extras[arm] = json.load(f)["extra"]
            continue
        _claim_arm_dir(arm_dir, key, arm, log)
        t0 = time.perf_counter()
        result = run_arm(w, arm, m)
        if result.preempted:
            raise SystemExit(f"preempted during arm {arm}; rerun the same command to resume")
        train_s = time.perf_counter() - t0
        log(f"{arm}: trained in {train_s:.0f} s; evaluating")
        ev = evaluate_model(w, config, result.state.params, base=evals["base"], base_params=base,
                            seed=s.seed)  # fmt: skip
        history = _history(arm_dir)
        tokens = sum(h.get("sampled_tokens", h.get("num_tokens", 0.0)) or 0.0 for h in history)
        extra = {"tokens": tokens, "train_seconds": train_s}
        if result.last_batch is not None:
            lp, mask = _batch_nll(config, result.state.params, result.last_batch, w.tok.pad_id)
            own = ev.samples
            extra["state_locality"] = metrics.state_locality(lp, mask, own.logprobs * own.mask,
                                                              own.mask)  # fmt: skip
        _save_eval(eval_path, key, ev, {"extra": extra})
        evals[arm], extras[arm] = ev, extra
    metrics_dict = assemble(s, evals, extras, m.history, m.describe)
    metrics_dict["settings"]["wall_seconds"] = round(time.perf_counter() - start, 1)
    paths = report.write_report(s.workdir, metrics_dict)
    log(f"report: {paths['report']}")
    return metrics_dict


def assemble(s: Settings, evals: dict[str, Evaluation], extras: dict[str, dict],
             pre_hist: dict, describe: dict) -> dict:  # fmt: skip
    """The report's metrics dictionary from the evaluations (see `jaxpost.report`)."""
    base_p1 = evals["base"].scalars["pass@1"]["mean"]
    arms = {}
    for name, ev in evals.items():
        scalars = dict(ev.scalars)
        extra = extras.get(name, {})
        if name == "base":
            scalars["efficiency"] = {"mean": 0.0}  # no tokens spent, nothing gained
        if "tokens" in extra:
            gain = scalars["pass@1"]["mean"] - base_p1
            scalars["efficiency"] = {"mean": gain / max(extra["tokens"], 1.0) * 1e3}
            scalars["state_locality"] = {"mean": extra.get("state_locality", float("nan"))}
        arm_dir = os.path.join(s.workdir, "arms", name)
        arms[name] = {
            "kind": "reference" if name in ("base", "teacher") else "arm",
            "curves": ev.curves,
            "scalars": scalars,
            "history": _history(arm_dir) if name not in ("base", "teacher") else [],
        }
    countdown_task = s.task == "countdown"
    if countdown_task:
        task = (f"Countdown, 3 numbers in {list(s.number_range)}, targets in "
                f"{list(s.target_range)}, >= {s.min_solutions} solutions")  # fmt: skip
    else:
        task = f"GSM8K ({s.gsm8k_dir or 'TFDS gsm8k in ' + s.tfds_data_dir})"
    steering = (f"; steering: {s.steer_problems} prompts × {s.steer_samples}" if countdown_task
                else "; steerability not measured (a Countdown probe)")  # fmt: skip
    settings = {
        "task": task,
        "student": describe["student"],
        "base": describe["base"],
        "teacher": describe["teacher"],
        "budget per arm": f"{s.arm_steps} steps × {s.prompts_per_step} prompts × "
                          f"{s.group_size} samples, lr {s.arm_lr}, ≤ {s.max_new_tokens} new tokens",
        "evaluation": f"{s.eval_problems} held-out problems × {s.eval_samples} samples at "
                      f"temperature 1; retention: {s.retention_problems} addition problems × "
                      f"{s.retention_samples}{steering}",
        "arms": ", ".join(f"{a} ({ARM_HELP[a]})" for a in s.arms),
        "efficiency": "pass@1 gained over the base per 1k sampled (on-policy) or trained (SFT) "
                      "tokens",
        "seed": s.seed,
    }
    if s.mesh or s.loss_impl:
        settings["devices"] = f"mesh {s.mesh or 'none'}; OPD loss {s.loss_impl or 'dense jnp'}"
    solutions = ("distinct correct solutions" if countdown_task else
                 "distinct reasoning paths of correct samples (gsm8k.reasoning_path)")  # fmt: skip
    notes = [
        "pass@large_k is pass@k at k = the number of samples per problem; diversity is the "
        f"entropy (nats) of the empirical distribution of {solutions} per problem.",
        "state_locality: per-token NLL of the final policy on its last training batch minus on "
        "its own samples (≈0 for on-policy training).",
        "rank_bias: Spearman correlation, within each problem, between the base's sequence "
        "logprob of a correct sample and its change under the arm (He et al.).",
    ]
    if any(pre_hist.values()):
        notes.append("Pretraining curves (loss) of base/teacher: final loss "
                     + ", ".join(f"{k} {v[-1]['loss']:.3f}" for k, v in pre_hist.items() if v))
    axes = [a for a in RADAR_AXES if countdown_task or a != "steerability"]
    return {
        "arms": arms,
        "radar_axes": axes,
        "claims": claims(evals),
        "settings": settings,
        "notes": notes,
    }


__all__ = ["ARMS", "TASKS", "Evaluation", "Models", "Settings", "assemble", "base_and_teacher",
           "claims", "evaluate_model", "miniature", "run", "run_arm", "tokenizer_for"]  # fmt: skip
