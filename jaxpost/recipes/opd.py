"""On-policy distillation (OPD) and self-distillation (OPSD), evaluated before and after
(experiments.opd)."""

from __future__ import annotations

import os
import time

import numpy as np

from jaxpost import data, inputs, loops, teachers, train
from jaxpost.errors import UserError
from jaxpost.recipes import common, opd_teachers
from jaxpost.workdir import holding


def _check(config) -> None:
    if config.mode not in ("opd", "opsd"):
        raise UserError(f'mode must be "opd" or "opsd", got {config.mode!r}')
    if config.mode == "opsd" and config.teacher:
        raise UserError("mode opsd distils from the frozen student; drop --teacher")
    if config.self_teacher not in teachers.SELF_TEACHERS:
        raise UserError(f"self_teacher must be one of {teachers.SELF_TEACHERS}, got "
                        f"{config.self_teacher!r}")  # fmt: skip
    if config.self_teacher != "frozen" and config.mode != "opsd":
        raise UserError("self_teacher live / ema is OPSD's (the student is its own teacher): "
                        "use --config.mode=opsd")  # fmt: skip
    if config.self_teacher == "ema" and not 0 <= config.ema_decay < 1:
        raise UserError(f"ema_decay must lie in [0, 1), got {config.ema_decay}")
    if config.self_teacher == "ema" and (config.lora_rank or config.mesh):
        raise UserError("self_teacher ema runs without lora_rank and without --mesh (not yet)")
    if config.mode == "opsd" and config.teacher_devices:
        raise UserError("teacher_devices is for mode opd (OPSD's teacher is the student)")
    opd_teachers.check(config)


def loss_function(config):
    """The OPD loss the config names (`inputs.distillation_loss`); for loss "sampled" the full
    distribution's reverse KL, which the memory check plans for (it needs more than the sampled
    token's logprob)."""
    if config.loss == "sampled":
        if not config.sampled_coef > 0:
            raise UserError(f"sampled_coef must be > 0, got {config.sampled_coef}")
        return inputs.distillation_loss("kl", alpha=1.0)
    return inputs.distillation_loss(config.loss, alpha=float(config.alpha),
                                    temperature=config.distill_temperature,
                                    prefix_len=config.prefix_len)  # fmt: skip


@holding
def run(config) -> dict:
    """OPD / OPSD with before/after evaluation; returns {"results", "wall_s", "model_dir"}."""
    start = time.perf_counter()
    _check(config)
    common.lora_config(config)
    train.resolve_loss_impl(config.loss_impl)
    loss_fn = loss_function(config)
    workdir = common.require_workdir(config)
    mesh, teacher_mesh = opd_teachers.meshes(config)
    common.describe_devices(mesh)
    if teacher_mesh is not None:
        common.log(f"teachers on their own devices: {len(teacher_mesh.devices.flat)} (FSDP)")
    task = inputs.make_task(config.task)
    sampling = common.sampling_config(config.sampling)
    student = common.student(config, task, mesh)
    tok, L = student.tokenizer, config.loop
    problems = inputs.problems(task, "train", config.train_problems, config.seed)
    texts = [task.render_prompt(p) for p in problems]
    prompts = inputs.encode_prompts(student, texts, max_new_tokens=sampling.max_new_tokens,
                                    what="OPD rollouts")  # fmt: skip
    render, feedback, feedback_width, service, crossed = None, None, 0, None, False
    if config.mode == "opd":
        found = opd_teachers.load(config, task, student, mesh, teacher_mesh)
        teacher = found[0]
        teacher_prompts = inputs.encode_prompts(teacher, texts,
                                                max_new_tokens=sampling.max_new_tokens,
                                                what="the teacher's prompts")  # fmt: skip
        crossed = opd_teachers.cross(student, teacher)
        if not crossed:
            teacher_prompts = None  # the student's own prompt arrays
        if config.teacher_topk:
            service = opd_teachers.service(config, student, found, loss_fn,
                                           mesh if teacher_mesh is None else teacher_mesh)
    else:
        who = {"frozen": "the frozen starting student", "live": "the live student (the current "
               "policy)", "ema": f"an EMA of the student (decay {config.ema_decay:g})"}  # fmt: skip
        teacher = student.replace(source=who[config.self_teacher])
        found = [teacher]
        rng = np.random.default_rng([config.seed, 13])
        teacher_texts = [task.privileged_view(p, rng).teacher_prompt for p in problems]
        teacher_prompts = inputs.encode_prompts(teacher, teacher_texts,
                                                max_new_tokens=sampling.max_new_tokens,
                                                what="OPSD teacher prompts")  # fmt: skip

        def render(p):
            return task.privileged_view(p, np.random.default_rng(0)).teacher_prompt

        if config.privileged == "feedback":  # the verifier's message on the row's own attempt
            feedback, feedback_width = opd_teachers.feedback_source(task, problems, student, prompts)
            teacher_prompts, render = None, None
            if data.round_up(feedback_width, 16) + sampling.max_new_tokens > student.config.max_seq_len:
                raise UserError(f"feedback prompts ({feedback_width} tokens) plus max_new_tokens "
                                f"exceed max_seq_len {student.config.max_seq_len}")  # fmt: skip
        if config.teacher_topk:
            service = opd_teachers.service(config, student, found, loss_fn, mesh)
    context = {"opd": "", "opsd": " with a reference solution in its prompt"}[config.mode]
    if feedback is not None:
        context = " with the verifier's message on the student's attempt in its prompt"
    if crossed:
        context = " (another tokenizer: distilled on aligned text, jaxpost.cross_tokenizer)"
    common.log(f"student: {student.describe()}\n" + "".join(
        f"teacher: {t.describe()}{context}\n" for t in found).rstrip())  # fmt: skip

    def reward(i: int, completion: list[int]) -> float:  # logged as the rollout pass rate
        return float(task.verify_answer(problems[i], tok.decode(completion)))

    source = loops.PromptSource(prompts, reward=reward, teacher_prompts=teacher_prompts,
                                eos_id=tok.eos_id, pad_id=tok.pad_id, teacher_feedback=feedback,
                                teacher_width=feedback_width)  # fmt: skip
    rows = L.batch_size * sampling.group_size
    sets = common.eval_sets(config, task)
    # a top-k teacher is scored outside the step: the student's step is then planned as a
    # per-token loss over its own head (as GRPO's), the k + 1 scores a token a small input
    teacher_terms = dict(objective="grpo") if service else dict(
        objective="opd", teacher_config=teacher.config, distill_loss=loss_fn,
        teacher_prompt_len=source.width(teacher=True) if source.privileged else None)  # fmt: skip
    inputs.check_memory(student.config, mesh, loss_impl=config.loss_impl, batch=rows,
                        prompt_len=source.width(), completion_len=sampling.max_new_tokens,
                        grad_accum=config.optim.grad_accum,
                        sample_batch=max(rows, common.eval_rows(sets, config.eval, mesh)),
                        lora_rank=config.lora_rank, **teacher_terms)  # fmt: skip
    results = {"start": common.evaluate_sets("start", student, student.params, sets, config.eval,
                                              mesh=mesh)}  # fmt: skip
    if config.eval.teacher and task.name in sets and feedback is None:
        for i, t in enumerate(found):
            label = "teacher (privileged)" if config.mode == "opsd" else "teacher"
            label += f" {i}" if len(found) > 1 else ""
            results[label] = common.evaluate_sets(
                label, t, t.params, {task.name: sets[task.name]}, config.eval,
                mesh=teacher_mesh if teacher_mesh is not None else mesh,
                render={task.name: render} if render else None)  # fmt: skip

    common.log(f"{config.mode}: {L.steps} steps of {L.batch_size} prompts x "
               f"{sampling.group_size} samples, alpha {config.alpha:g}, loss {config.loss!r}, "
               f"lr {config.optim.learning_rate:g}")  # fmt: skip
    train_start = time.perf_counter()
    run_args = (common.optim_config(config.optim, L.steps),
                common.loop_config(L, seed=config.seed, workdir=workdir, desc=config.mode),
                sampling)  # fmt: skip
    if config.loss == "sampled":
        result = loops.run_sampled_opd(
            student.config, student.params, teacher.config, teacher.params, source, *run_args,
            coef=config.sampled_coef, with_reward=bool(config.sampled_with_reward), mesh=mesh,
            loss_impl=config.loss_impl, is_correction=True, lora=common.lora_config(config),
        )  # fmt: skip
    else:
        result = loops.run_opd(student.config, student.params, teacher.config, teacher.params,
                               source, loss_fn, *run_args, mesh=mesh, loss_impl=config.loss_impl,
                               teacher_topk=service or 0, lora=common.lora_config(config),
                               self_teacher=config.self_teacher, ema_decay=config.ema_decay)  # fmt: skip
    common.stop_if_preempted(result, config.mode)
    if result.history:
        h = result.history
        first, last = h[: min(10, len(h))], h[-min(10, len(h)) :]
        common.log(
            f"{config.mode}: loss {np.mean([r['loss'] for r in first]):.4g} (first 10 steps) -> "
            f"{np.mean([r['loss'] for r in last]):.4g} (last 10); rollout pass rate "
            f"{np.mean([r['pass_rate'] for r in first]):.3f} -> "
            f"{np.mean([r['pass_rate'] for r in last]):.3f} "
            f"({time.perf_counter() - train_start:.0f} s)"
        )  # fmt: skip
    params = result.params
    label = f"after {config.mode.upper()}"
    results[label] = common.evaluate_sets(label, student, params, sets, config.eval, mesh=mesh)
    model_dir = inputs.save_model(os.path.join(workdir, "model"), student, params)
    return common.report(workdir, results, config.eval, start, model_dir)
