"""The head-to-head's world (tasks, problems, mesh) and its two models: the base and the teacher.

The *base* student is SFT-trained on a mixture (`inputs.sft_mixture`) of a narrow slice of the
task's solutions (`base.style`), the retention task (addition), the task's steering probe and
privileged-context prompts (so it can read a reference solution, which OPSD needs). The *teacher*
is the base trained longer on the same mixture with the full solution distribution. Both are
cached in WORKDIR/models/<model_key>/ as Hugging Face directories; a `--model` checkpoint is the
base as it is (or SFT-trained `base.steps` more), a `--teacher` checkpoint the teacher.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from jaxpost import inputs, loops, train
from jaxpost.errors import Preempted, UserError
from jaxpost.headtohead import settings
from jaxpost.inputs import Model
from jaxpost.tasks import addition


@dataclasses.dataclass
class World:
    """The tasks, problem sets and devices every stage of a run shares."""

    config: Any
    task: Any
    retention: addition.Addition
    steer: Any  # the task's steering probe, or None
    train: list
    test: list
    retention_test: list
    steer_test: list
    mesh: Any = None
    teacher_train: list | None = None  # the built-in teacher's problems: a superset of `train`
    # the arms' training problems: `train`, or `arm.fresh_problems` the base never saw
    arm_problems: list | None = None

    @property
    def progress(self) -> bool:
        return bool(self.config.progress)


def world(config) -> World:
    task = inputs.make_task(config.task)
    retention = addition.Addition(digits=tuple(config.task.addition_digits))
    steer = task.steering()
    e, n_base, n_fresh = config.eval, config.base.train_problems, config.arm.fresh_problems
    # the first n problems of a draw are the draw of n: the base's are the first n_base, the
    # arms' fresh ones the next n_fresh, and the teacher's pool holds the base's
    n_train = max(n_base + n_fresh, config.teacher_problems)
    try:
        draw = inputs.problems(task, "train", n_train, config.seed)
        test = inputs.problems(task, "test", e.problems, config.seed)
    except UserError as err:
        raise UserError(f"{err} (training problems: max(base.train_problems + "
                        f"arm.fresh_problems, teacher_problems) = {n_train}; test problems: "
                        f"eval.problems = {e.problems})") from None  # fmt: skip
    return World(
        config=config, task=task, retention=retention, steer=steer,
        train=draw[:n_base],
        test=test,
        teacher_train=draw[:max(n_base, config.teacher_problems)],
        arm_problems=draw[n_base:n_base + n_fresh] or draw[:n_base],
        retention_test=inputs.problems(retention, "test", e.retention_problems, config.seed),
        steer_test=inputs.problems(steer, "test", e.steer_problems, config.seed) if steer else [],
        mesh=inputs.make_mesh(config.mesh),
    )  # fmt: skip


def teacher_style(config) -> str:
    """The built-in teacher's solutions: `teacher_style`, or the base's slice when empty."""
    return config.teacher_style or config.base.style


def mixture(w: World, style: str, seed: int, problems=None) -> list[tuple[str, str]]:
    """The base's and teacher's SFT texts: `style` solutions of `problems` (default the train
    problems) plus retention, steering and privileged-context examples (half, a quarter and a
    quarter as many)."""
    problems = w.train if problems is None else problems
    return inputs.sft_mixture(w.task, problems, style=style, per_problem=2, seed=seed,
                              retention=w.retention, retention_share=0.5, steering_share=0.25,
                              privileged_share=0.25)  # fmt: skip


def _pretrain(w: World, model: Model, style: str, steps: int, desc: str, seed: int,
              problems=None):  # fmt: skip
    c = w.config
    examples = inputs.encode_examples(model, mixture(w, style, seed, problems), f"{desc} data")
    optim = train.OptimConfig(learning_rate=c.base.learning_rate, warmup_steps=min(20, steps),
                              total_steps=steps)  # fmt: skip
    loop = loops.LoopConfig(steps=steps, batch_size=c.base.batch_size, seed=seed,
                            progress=w.progress, desc=desc)  # fmt: skip
    result = loops.run_sft(model.config, model.params, examples, optim, loop,
                           pad_id=model.tokenizer.pad_id, mesh=w.mesh, loss_impl=c.loss_impl,
                           pack=c.base.pack)  # fmt: skip
    if result.preempted:  # no checkpoints here: a partial model must not be cached as the base
        raise Preempted(f"{desc}: preempted (SIGTERM) during its SFT; nothing of it was saved; "
                        f"rerun the same command to train it again")  # fmt: skip
    return result.params, result.history


@dataclasses.dataclass
class Models:
    """The base student and the teacher of a run (the teacher may have another architecture)."""

    base: Model
    teacher: Model
    history: dict  # {"base"/"teacher": SFT curve}, empty for a checkpoint used as it is
    describe: dict  # {"student"/"base"/"teacher": one line for the report}


def base_and_teacher(w: World, log=print, check: Callable[[Model, Any], None] | None = None,
                     with_teacher: bool = True) -> Models:  # fmt: skip
    """The base and teacher, trained once per model_key (or loaded from the given checkpoints).

    `check(student, teacher_config)` runs once both architectures are known and before any
    training (the memory plan of every step the run will take). Without `with_teacher` only
    the base is built (the teacher field holds the base)."""
    c = w.config
    root = os.path.join(c.workdir, "models", settings.model_key(c))
    start = inputs.load_model(c.model, tokenizer=c.tokenizer, overrides=c.model_overrides,
                              dtype=c.dtype, seed=c.seed, remat=c.remat)  # fmt: skip
    origin = (f"{c.model} ({start.config.family})" if settings.pretrained(c)
              else f"built-in {start.config.family}-style decoder")  # fmt: skip

    def cached(path: str, model: Model, style: str, steps: int, desc: str, seed: int,
               problems=None):  # fmt: skip
        if os.path.isfile(os.path.join(path, "config.json")):
            log(f"reusing {path}")
        return inputs.reuse_or_train(path, model, lambda: _pretrain(w, model, style, steps, desc,
                                                                    seed, problems))  # fmt: skip

    given = None
    if c.teacher:
        given = inputs.load_model(c.teacher, tokenizer=c.tokenizer, dtype=c.dtype)
        inputs.check_teacher(start, given)
    if check is not None:
        check(start, start.config if given is None else given.config)
    if c.base.steps > 0:
        base, base_hist = cached(os.path.join(root, "base"), start, c.base.style, c.base.steps,
                                 "base (SFT, narrow slice)", c.seed)  # fmt: skip
    else:
        base, base_hist = start, []
    if not with_teacher:
        teacher, teacher_hist, teacher_line = base, [], "none (not built)"
    elif given is not None:
        teacher, teacher_hist = given, []
        teacher_line = f"{c.teacher} ({teacher.config.num_params():,} parameters)"
    else:
        style = teacher_style(c)
        what = "all solutions" if style == "all" else f"slice '{style}'"
        teacher, teacher_hist = cached(os.path.join(root, "teacher"), base, style,
                                       c.teacher_steps, f"teacher (SFT, {what})", c.seed + 1,
                                       w.teacher_train)  # fmt: skip
        teacher_line = f"the base trained {c.teacher_steps} more steps with {what}"
        if w.teacher_train and len(w.teacher_train) > len(w.train):
            teacher_line += f" of {len(w.teacher_train)} problems (the base's {len(w.train)} and more)"
    base, teacher = base.on(w.mesh), teacher.on(w.mesh)  # loops and sampling agree on devices
    extras = " + addition" + (" + steering" if w.steer else "") + " + privileged-context examples"
    rows = f"{c.base.batch_size} packed rows" if c.base.pack else str(c.base.batch_size)
    base_line = (f"SFT {c.base.steps} steps × {rows} on {w.task.name} slice "
                 f"'{c.base.style}'{extras}")  # fmt: skip
    if c.base.steps == 0:
        base_line = f"the checkpoint {c.model} as it is"
    cfg = base.config
    return Models(
        base=base, teacher=teacher, history={"base": base_hist, "teacher": teacher_hist},
        describe={"student": f"{origin}, d_model={cfg.d_model}, {cfg.n_layers} layers "
                             f"({cfg.num_params():,} parameters)",
                  "base": base_line, "teacher": teacher_line},
    )  # fmt: skip

