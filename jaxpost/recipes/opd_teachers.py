"""The OPD main's teachers: where they come from, which devices they sit on, how a top-k teacher
is served (several teachers, a score cache, another tokenizer), and OPSD's feedback context."""

from __future__ import annotations

import os

import jax

from jaxpost import inputs, sharding, tasks
from jaxpost.errors import UserError
from jaxpost.recipes import common
from jaxpost.teacher_service import TopkTeachers

PRIVILEGED = ("solution", "feedback")
FEEDBACK_TOKENS = 48  # the verifier's message is cut to this many tokens


def check(config) -> None:
    """The teacher settings' one-line errors."""
    if config.privileged not in PRIVILEGED:
        raise UserError(f"privileged must be one of {PRIVILEGED}, got {config.privileged!r}")
    if config.privileged == "feedback" and config.mode != "opsd":
        raise UserError("privileged feedback is OPSD's context: use --config.mode=opsd")
    if config.teacher_topk < 0:
        raise UserError(f"teacher_topk must be >= 0 (0: the full distribution), got "
                        f"{config.teacher_topk}")  # fmt: skip
    if config.teacher_topk and (config.loss != "kl" or config.prefix_len):
        raise UserError("teacher_topk > 0 needs loss 'kl' and prefix_len 0 (a top-k teacher is "
                        "scored outside the student's step)")  # fmt: skip
    served = {"teacher_devices": config.teacher_devices, "teacher_cache_rows":
              config.teacher_cache_rows, "several --teacher directories": "," in config.teacher}  # fmt: skip
    for what, on in served.items():
        if on and not config.teacher_topk:
            raise UserError(f"{what} needs a top-k teacher: add --config.teacher_topk=64")
    if config.teacher_devices < 0 or config.teacher_cache_rows < 0:
        raise UserError("teacher_devices and teacher_cache_rows must be >= 0")


def meshes(config):
    """(the student's mesh or None, the teachers' mesh or None): with `teacher_devices` = n the
    last n devices hold the teachers (FSDP over them) and `--mesh` spans the others."""
    n = config.teacher_devices
    if not n:
        return inputs.make_mesh(config.mesh), None
    devices = jax.devices()
    if jax.process_count() > 1:
        raise UserError("teacher_devices runs in one process (the teachers' scores are not "
                        "exchanged between hosts yet)")  # fmt: skip
    if not 0 < n < len(devices):
        raise UserError(f"teacher_devices must lie in [1, {len(devices) - 1}] on {len(devices)} "
                        f"devices (the student keeps at least one), got {n}")  # fmt: skip
    mine, theirs = devices[:-n], devices[-n:]
    student = None
    if config.mesh:
        try:
            student = sharding.make_mesh(config.mesh, devices=mine)
        except ValueError as e:
            raise UserError(f"mesh {config.mesh!r} on the student's {len(mine)} devices (the "
                            f"other {n} are the teachers'): {e}") from None  # fmt: skip
    return student, sharding.make_mesh("fsdp=-1", devices=theirs)


def load(config, task, student: inputs.Model, mesh, teacher_mesh) -> list[inputs.Model]:
    """The teachers of mode opd: each `--teacher` directory (comma-separated), or the built-in
    SFT-trained teacher. A teacher of another tokenizer is only accepted for a top-k teacher
    (distilled across tokenizers, `jaxpost.cross_tokenizer`)."""
    place = teacher_mesh if teacher_mesh is not None else mesh
    if config.teacher:
        out = [common.load(config, d, student=False).on(place) for d in config.teacher.split(",")]
    else:
        start = common.load(config, config.model)
        if config.model not in common._presets():
            raise UserError("mode opd needs --teacher=DIR when the student is a checkpoint (the "
                            "built-in teacher is SFT-trained from a preset)")  # fmt: skip
        out = [common.built_in(config.teacher_sft, task, start,
                               os.path.join(config.workdir, "teacher"), seed=config.seed,
                               mesh=mesh, what="teacher", loss_impl=config.loss_impl).on(place)]  # fmt: skip
    for teacher in out:
        if not config.teacher_topk or not cross(student, out[0]):
            inputs.check_teacher(student, teacher)
        elif cross(out[0], teacher):
            raise UserError(f"teachers {out[0].source} and {teacher.source} have different "
                            f"tokenizers; several teachers share one")  # fmt: skip
    return out


def cross(a: inputs.Model, b: inputs.Model) -> bool:
    """Whether two models' tokenizers differ (`inputs.check_teacher` would refuse them)."""
    try:
        inputs.check_teacher(a, b)
    except UserError:
        return True
    return False


def service(config, student: inputs.Model, teachers: list[inputs.Model], loss_fn,
            mesh) -> TopkTeachers:  # fmt: skip
    """The top-k teachers' service of the run, on `mesh` (their own, or the student's): teacher t
    scores the pool's problems i with i mod T = t (T teachers: the pool's interleaved shards are
    their data sources)."""
    n = len(teachers)
    if jax.process_count() > 1:
        raise UserError("teacher_topk runs in one process (the teachers' scores are not "
                        "exchanged between hosts yet)")  # fmt: skip
    for t in teachers:
        if config.teacher_topk > t.config.vocab_size:
            raise UserError(f"teacher_topk {config.teacher_topk} exceeds the vocabulary of "
                            f"{t.source} ({t.config.vocab_size})")  # fmt: skip
    pair = (student.tokenizer, teachers[0].tokenizer) if cross(student, teachers[0]) else None
    return TopkTeachers([(t.config, t.params) for t in teachers], config.teacher_topk,
                        temperature=loss_fn.temperature, loss_impl=config.loss_impl,
                        mesh=mesh, route=(lambda i: i % n) if n > 1 else None,
                        cache_rows=config.teacher_cache_rows, tokenizers=pair)  # fmt: skip


def feedback_source(task, problems, student: inputs.Model, prompts: list[list[int]]):
    """(teacher_feedback, teacher_width) of a `loops.PromptSource` whose teacher sees the
    verifier's message on the row's own attempt before the prompt ("Feedback on an earlier
    attempt: <message>", `tasks.feedback`), the self-distillation-from-feedback context."""
    tok = student.tokenizer
    nl = tok.encode("\n")

    def view(i: int, completion: list[int]) -> list[int]:
        message = tasks.feedback(task, problems[i], tok.decode(completion))
        head = tok.encode(f"Feedback on an earlier attempt: {message}")[:FEEDBACK_TOKENS] + nl
        bos = prompts[i][:1] if tok.bos_id is not None and prompts[i][:1] == [tok.bos_id] else []
        return bos + head + prompts[i][len(bos) :]

    return view, max(len(p) for p in prompts) + FEEDBACK_TOKENS + len(nl)
