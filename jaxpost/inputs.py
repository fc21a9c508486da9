"""Load and check what a user gives: models with their tokenizers, teachers, tasks, prompts, meshes.

Every program (experiments/*) goes through these functions, so a given mistake gets the same
one-line `UserError` everywhere, naming the problem and the fix:

    model = inputs.load_model("small")                  # a preset, randomly initialized
    model = inputs.load_model("/ckpt/Qwen2.5-0.5B")     # a local HF checkpoint + its tokenizer
    teacher = inputs.load_model("/ckpt/teacher")
    inputs.check_teacher(model, teacher)                # one tokenizer, one vocabulary
    task = inputs.make_task(config.task)                # countdown | gsm8k | addition
    ids = inputs.encode_prompts(model, texts, max_new_tokens=32, what="training prompts")
    model, history = inputs.reuse_or_train(path, model, train_fn)   # trained once, then cached
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxpost import data, losses, models, plan, sharding, tokenizers
from jaxpost.errors import UserError
from jaxpost.models import ModelConfig, hf
from jaxpost.tokenizers import CharTokenizer, HFTokenizer, Tokenizer

PAD_MULTIPLE = 16  # prompts and SFT rows are padded to multiples of it (few compiled shapes)
TASKS = ("countdown", "gsm8k", "addition")


# ---------------------------------------------------------------------------------------------
# models and tokenizers


@dataclasses.dataclass(frozen=True)
class Model:
    """A model to train or evaluate: its config, parameters, tokenizer and where it came from."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    source: str

    def replace(self, **changes) -> Model:
        return dataclasses.replace(self, **changes)

    def on(self, mesh) -> Model:
        """Its parameters sharded over `mesh` by the logical rules (as they are without one)."""
        if mesh is None:
            return self
        placed = sharding.shard_params(self.params, sharding.param_shardings(self.config, mesh))
        return self.replace(params=placed)

    def describe(self) -> str:
        c = self.config
        return (f"{self.source} ({c.num_params() / 1e6:.2f}M parameters, {c.family}, "
                f"d_model {c.d_model}, {c.n_layers} layers, vocab {c.vocab_size})")  # fmt: skip


def load_tokenizer(spec: str, model_dir: str | None) -> Tokenizer:
    """ "char", a tokenizer directory, or "auto": the model directory's own tokenizer (its
    Hugging Face files, or the character tokenizer when jaxpost's marker says so); "auto"
    without a directory (a preset) is the character tokenizer."""
    if spec == "char":
        return CharTokenizer()
    if spec != "auto":
        if not os.path.isdir(spec):
            raise UserError(f"tokenizer directory not found: {spec}")
        return HFTokenizer.from_dir(spec)
    if model_dir is None:
        return CharTokenizer()
    try:
        return tokenizers.from_model_dir(model_dir)
    except (ValueError, OSError) as e:
        raise UserError(f"{e}; save the tokenizer beside the weights or pass "
                        f"--config.tokenizer=char or --config.tokenizer=DIR") from None  # fmt: skip


_NOT_OVERRIDABLE = ("vocab_size", "rope_scaling")


def parse_overrides(text: str) -> dict[str, Any]:
    """ "d_model=96,n_layers=3" -> {"d_model": 96, "n_layers": 3}, typed like ModelConfig."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    settable = sorted(set(fields) - set(_NOT_OVERRIDABLE))
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in settable:
            raise UserError(f"bad model override {item!r}: expected FIELD=VALUE with FIELD one of "
                            f"{settable} (vocab_size follows the tokenizer)")  # fmt: skip
        default = fields[key].default
        try:
            if isinstance(default, bool):
                out[key] = {"true": True, "false": False}[value.strip().lower()]
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            elif default is None:  # the optional special-token ids
                out[key] = int(value)
            else:
                out[key] = value.strip()
        except (KeyError, ValueError):
            raise UserError(f"bad value in model override {item!r}") from None
    return out


def load_model(spec: str, *, tokenizer: str = "auto", overrides: str = "", dtype: str = "",
               seed: int = 0, remat: str = "") -> Model:  # fmt: skip
    """A preset name (randomly initialized from `seed`, its vocabulary sized to the tokenizer)
    or a local Hugging Face checkpoint directory with its tokenizer; checks that they agree.

    `dtype` ("float32", "bfloat16"; "" keeps the preset's or checkpoint's) sets parameter and
    compute dtype; `overrides` replaces preset fields ("d_model=96,n_layers=3"); `remat`
    (`models.configs.REMAT`; "" keeps the model's) what each layer keeps for the backward.
    """
    if dtype and dtype not in models.configs.DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(models.configs.DTYPES)}")
    if remat and remat not in models.configs.REMAT:
        raise UserError(f"unknown remat {remat!r}; choose from {', '.join(models.configs.REMAT)}")
    model = _load(spec, tokenizer, overrides, dtype, seed)
    if remat:
        model = model.replace(config=dataclasses.replace(model.config, remat=remat))
    return model


def _load(spec: str, tokenizer: str, overrides: str, dtype: str, seed: int) -> Model:
    if spec in models.PRESETS:
        tok = load_tokenizer(tokenizer, None)
        changes = parse_overrides(overrides)
        if dtype:
            changes.update(dtype=dtype, param_dtype=dtype)
        try:
            config = models.get_config(spec, vocab_size=tok.vocab_size, **changes)
        except ValueError as e:
            raise UserError(f"model {spec!r}: {e}") from None
        return Model(config, models.init(config, seed=seed), tok, spec)
    if not os.path.isdir(spec):
        raise UserError(f"model not found: {spec!r} is neither a preset "
                        f"({', '.join(models.PRESETS)}) nor a directory")  # fmt: skip
    if overrides:
        raise UserError("model_overrides apply to presets only, not to a checkpoint directory")
    config, params = hf.load_hf(spec, dtype=dtype or None)
    tok = load_tokenizer(tokenizer, spec)
    if tok.vocab_size > config.vocab_size:
        raise UserError(
            f"vocabulary mismatch: the tokenizer has {tok.vocab_size} ids but the model in {spec} "
            f"has an embedding table of {config.vocab_size} rows; pass the checkpoint's own "
            f"tokenizer"
        )
    return Model(config, params, tok, spec)


def save_model(path: str, model: Model, params=None) -> str:
    """Write `params` (default: the model's) as a Hugging Face directory with the tokenizer
    beside them, atomically (`hf.save_hf`). On several processes every process must call it
    (the parameters are gathered from all hosts); process 0 writes."""
    params = model.params if params is None else params
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return path
    hf.save_hf(path, model.config, params)
    tokenizers.save_beside(path, model.tokenizer)
    return path


_TOKENIZER_PROBE = "Question: 12 + 30 = ? Answer: 42\n"


def check_teacher(student: Model, teacher: Model, sample_text: str = _TOKENIZER_PROBE) -> None:
    """Token-level distillation needs one vocabulary: same size, special ids and ids of a probe."""
    a, b = student.tokenizer, teacher.tokenizer
    same = (a.vocab_size, a.pad_id, a.bos_id, a.eos_id) == (b.vocab_size, b.pad_id, b.bos_id,
                                                            b.eos_id)  # fmt: skip
    try:
        same = same and a.encode(sample_text) == b.encode(sample_text)
    except ValueError:
        same = False
    if not same or teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(
            f"teacher {teacher.source} (vocab {teacher.config.vocab_size}) and student "
            f"{student.source} (vocab {student.config.vocab_size}) must share one tokenizer and "
            f"vocabulary for token-level distillation; pick a teacher of the student's family"
        )


def reuse_or_train(path: str, model: Model, train: Callable[[], tuple[Any, list[dict]]]
                   ) -> tuple[Model, list[dict]]:  # fmt: skip
    """The model saved at `path` (a Hugging Face directory and its training curve) if it is
    there; otherwise `train()` -> (params, history) from `model`, saved there first.

    The directory appears atomically once training finished, so an interrupted run never
    leaves a half model to be reused; the training itself resumes from its own checkpoints.
    """
    history_file = os.path.join(path, "history.json")
    if os.path.isfile(os.path.join(path, "config.json")):
        config, params = hf.load_hf(path, dtype=model.config.dtype)
        config = dataclasses.replace(config, remat=model.config.remat)  # the run's, not saved
        history = []
        if os.path.isfile(history_file):
            with open(history_file) as f:
                history = json.load(f)
        return model.replace(config=config, params=params, source=path), history
    params, history = train()
    save_model(path, model, params)
    if jax.process_index() == 0:
        with open(history_file, "w") as f:
            json.dump(history, f)
    return model.replace(params=params, source=path), history


# ---------------------------------------------------------------------------------------------
# tasks, prompts, data


def make_task(c) -> Any:
    """The task a config names (`c.name`): countdown (generated; knobs `c.countdown`), gsm8k
    (`c.data_dir` with train.jsonl / test.jsonl, or a prepared TFDS `c.tfds_data_dir`) or
    addition (`c.addition_digits`)."""
    from jaxpost.tasks import addition, countdown, gsm8k

    if c.name not in TASKS:
        raise UserError(f"unknown task {c.name!r}; choose from {', '.join(TASKS)}")
    try:
        if c.name == "countdown":
            k = c.countdown
            return countdown.Countdown(
                num_numbers=tuple(k.num_numbers), number_range=tuple(k.number_range),
                target_range=tuple(k.target_range), min_solutions=k.min_solutions,
                test_fraction=k.test_fraction,
            )  # fmt: skip
        if c.name == "addition":
            return addition.Addition(digits=tuple(c.addition_digits))
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {c.name} task settings: {e}") from None
    if bool(c.data_dir) == bool(c.tfds_data_dir):
        raise UserError("task gsm8k needs exactly one of --config.task.data_dir=DIR (train.jsonl and "
                        "test.jsonl in the GSM8K format) or --config.task.tfds_data_dir=DIR")  # fmt: skip
    try:
        if c.data_dir:
            paths = [os.path.join(c.data_dir, f"{s}.jsonl") for s in ("train", "test")]
            for path in paths:
                if not os.path.isfile(path):
                    raise UserError(f"GSM8K file not found: {path}")
            return gsm8k.GSM8K.from_jsonl(*paths)
        return gsm8k.GSM8K.from_tfds(c.tfds_data_dir)
    except (ValueError, OSError, KeyError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"loading GSM8K: {e}") from e


def problems(task, split: str, n: int, seed: int) -> list:
    """`n` problems of a split; asking for more than a task has is a UserError."""
    try:
        return task.prompts(split, n, seed)
    except ValueError as e:
        raise UserError(f"{task.name}: {e}") from None


def encode_prompts(model: Model, texts: Sequence[str], *, max_new_tokens: int, what: str
                   ) -> list[list[int]]:  # fmt: skip
    """Token ids of prompts (bos first), checked to leave room for `max_new_tokens` in the
    model's context after padding to a multiple of `PAD_MULTIPLE`."""
    try:
        ids = [model.tokenizer.encode(t, add_bos=True) for t in texts]
    except ValueError as e:
        raise UserError(f"{what}: the tokenizer cannot encode the task's text: {e}") from None
    if not ids:
        raise UserError(f"{what}: no prompts")
    longest = max(len(x) for x in ids)
    padded = data.round_up(longest, PAD_MULTIPLE)
    if padded + max_new_tokens > model.config.max_seq_len:
        raise UserError(
            f"{what}: the longest prompt ({longest} tokens, padded to {padded}) plus "
            f"max_new_tokens={max_new_tokens} is {padded + max_new_tokens} tokens, more than the "
            f"model's max_seq_len {model.config.max_seq_len}; use shorter prompts or fewer new "
            f"tokens"
        )
    return ids


def encode_examples(model: Model, pairs: Sequence[tuple[str, str]], what: str
                    ) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """(prompt ids, completion ids) of SFT pairs, checked to fit the model's context."""
    if not pairs:
        raise UserError(f"{what}: no training examples (the data settings select none)")
    try:
        examples = data.encode_pairs(model.tokenizer, pairs)
    except ValueError as e:
        raise UserError(f"{what}: the tokenizer cannot encode the task's text: {e}") from None
    width = data.pair_width(examples, PAD_MULTIPLE)
    if width > model.config.max_seq_len:
        raise UserError(f"{what}: the longest example ({width} tokens, padded) exceeds the "
                        f"model's max_seq_len {model.config.max_seq_len}")  # fmt: skip
    return examples


def sft_mixture(task, train_problems: Sequence, *, style: str = "all", per_problem: int = 1,
                seed: int = 0, retention=None, retention_share: float = 0.0,
                steering_share: float = 0.0, privileged_share: float = 0.0
                ) -> list[tuple[str, str]]:  # fmt: skip
    """SFT texts: the task's reference solutions of `style`, plus, as shares of that count,

      retention_share   solved problems of another task (`retention`, e.g. addition): the earlier
                        skill whose retention the head-to-head measures;
      steering_share    the task's steering probe with compliant solutions (if it has one);
      privileged_share  prompts with a reference solution in context (`task.privileged_view`),
                        so the model learns to read one, which OPSD's teacher needs.
    """
    try:
        pairs = list(task.sft_examples(list(train_problems), style=style, per_problem=per_problem,
                                       seed=seed))  # fmt: skip
    except ValueError as e:
        raise UserError(f"{task.name} SFT data: {e}") from None
    n = len(pairs)
    rng = np.random.default_rng([seed, 11])
    if retention is not None and retention_share > 0:
        extra = problems(retention, "train", max(int(n * retention_share), 8), seed)
        pairs += retention.sft_examples(extra, seed=seed)
    steer = task.steering()
    if steer is not None and steering_share > 0:
        extra = problems(steer, "train", max(int(n * steering_share), 4), seed)
        pairs += steer.sft_examples(extra, seed=seed)
    if privileged_share > 0:
        for p in list(train_problems)[: max(int(n * privileged_share), 4)]:
            view = task.privileged_view(p, rng)
            pairs.append((view.teacher_prompt, view.completion))
    return pairs


# ---------------------------------------------------------------------------------------------
# losses

DISTILLATION_LOSSES = ("kl", "entropy_aware")


def distillation_loss(kind: str = "kl", *, alpha: float = 1.0, temperature: float = 1.0,
                      prefix_len: int = 0):  # fmt: skip
    """An on-policy distillation loss by name: "kl" is `losses.opd_kl(alpha)` (0 forward KL,
    1 reverse KL, between the generalized JSD), "entropy_aware" the entropy-aware mix; with
    `prefix_len` > 0 only the first tokens of each completion count. The result is an
    `opd.OPDLossSpec`: the objective runs it on materialized logits, through a kernel, or from
    hidden states, as its `loss_impl` says (`train.LOSS_IMPLS`)."""
    if kind not in DISTILLATION_LOSSES:
        raise UserError(f"unknown distillation loss {kind!r}; choose from "
                        f"{', '.join(DISTILLATION_LOSSES)}")  # fmt: skip
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must lie in [0, 1] (0 forward KL, 1 reverse KL), got {alpha}")
    if prefix_len < 0 or not temperature > 0:
        raise UserError("prefix_len must be >= 0 and the distillation temperature > 0")
    if kind == "kl":
        fn = losses.opd_kl(float(alpha), temperature=temperature)
    else:
        fn = losses.entropy_aware_opd_kl(temperature=temperature)
    return losses.prefix_opd(fn, prefix_len) if prefix_len > 0 else fn


# ---------------------------------------------------------------------------------------------
# devices


def make_mesh(spec: str):
    """The (data, fsdp, tensor) mesh a flag names ("2,2,2", "fsdp=-1"; "" is no mesh: one device
    for a single process, every device data-parallel for several)."""
    if not spec:
        if jax.process_count() == 1:
            return None
        spec = "-1,1,1"
    try:
        return sharding.make_mesh(spec)
    except ValueError as e:
        raise UserError(f"mesh {spec!r} on {jax.device_count()} devices: {e}") from None


def check_memory(config, mesh, **step) -> Any:
    """The memory plan of the step about to compile, `plan.plan(config, mesh shape, **step)`
    (objective, loss_impl, batch, seq_len or prompt_len / completion_len, teacher_config, ...,
    on this device's memory); a plan that does not fit is a UserError naming the biggest term
    and the knob that shrinks it."""
    stats = jax.local_devices()[0].memory_stats() or {}
    mesh_shape = dict(mesh.shape) if mesh is not None else (1, 1, 1)
    try:
        p = plan.plan(config, mesh_shape, device_memory_bytes=stats.get("bytes_limit"), **step)
    except ValueError as e:
        raise UserError(f"memory plan: {e}") from None
    if not p.fits:
        raise UserError(p.message)
    return p

