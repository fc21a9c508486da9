"""The arms of the head-to-head: one table, one entry per arm.

Every arm starts from the base with the same budget: `arm.steps` updates over
`arm.prompts_per_step × arm.group_size` sequences each (SFT trains on that many dataset
sequences; the on-policy arms sample that many). An entry names the arm, says in one line what it
is, its kind and whether it trains on the student's own samples, and builds its run from an
`ArmContext`. Adding an arm is adding an entry:

    Arm("opd_jsd", "OPD, generalized JSD (alpha=0.5)", "distill", True, _opd(lambda c: _kl(c, 0.5))),
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import (
    data,
    gad,
    inputs,
    loops,
    lora,
    losses,
    opd,
    ovd,
    qsharp,
    sparse_select,
    spectrum,
    train,
)
from jaxpost.errors import UserError
from jaxpost.headtohead import settings
from jaxpost.headtohead.models import Models, World
from jaxpost.lora import LoraConfig
from jaxpost.rollouts import PromptSource, SamplingConfig


@dataclasses.dataclass(frozen=True)
class ArmContext:
    """What an arm's builder gets: the run's world and models, and the shared budget."""

    world: World
    models: Models
    optim: train.OptimConfig
    loop: loops.LoopConfig
    sampling: SamplingConfig
    source: PromptSource  # the training prompts with the verifier's reward
    lora: LoraConfig | None = None  # low-rank adapters on the base instead of full training

    @property
    def config(self):
        return self.world.config


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of the table: name, a one-line description (the report's), kind ("sft", "rl",
    "distill" with the teacher's whole distribution per token, "distill_sampled" with its
    logprob of the sampled token only), whether it trains on the student's own samples, and its
    builder."""

    name: str
    help: str
    kind: str
    on_policy: bool
    build: Callable[[ArmContext], loops.RunResult]


# ---------------------------------------------------------------------------------------------
# builders


def sft_examples(w: World, model: inputs.Model) -> list[tuple[list[int], list[int]]]:
    """The SFT arm's dataset: solutions drawn from the full solution set, as token pairs."""
    pairs = w.task.sft_examples(w.arm_problems, style="all", per_problem=4, seed=w.config.seed + 7)
    return inputs.encode_examples(model, pairs, "sft arm")


def _sft(ctx: ArmContext, lr_scale: str | None = None) -> loops.RunResult:
    """SFT; with `lr_scale` (an `arm` field) its learning rate scaled by that factor."""
    w, base = ctx.world, ctx.models.base
    loop = dataclasses.replace(ctx.loop, batch_size=ctx.loop.batch_size * ctx.sampling.group_size)
    optim = ctx.optim
    if lr_scale is not None:
        optim = dataclasses.replace(optim, learning_rate=optim.learning_rate
                                    * ctx.config.arm[lr_scale])  # fmt: skip
    return loops.run_sft(base.config, base.params, sft_examples(w, base), optim, loop,
                         pad_id=base.tokenizer.pad_id, mesh=w.mesh,
                         loss_impl=ctx.config.loss_impl, lora=ctx.lora)  # fmt: skip


def degraded_teacher(models: Models, config) -> inputs.Model:
    """The teacher deliberately weakened: each weight tensor plus Gaussian noise of
    `arm.degrade_noise` times its own RMS (seeded by the run's seed): a teacher still of the
    task, worse at it (the report evaluates it as `teacher_degraded`)."""
    t = models.teacher
    leaves, tree = jax.tree.flatten(t.params)
    rng = np.random.default_rng([config.seed, 41])
    noisy = []
    for x in leaves:
        x = np.asarray(x, np.float32)
        rms = float(np.sqrt(np.mean(x**2))) if x.size else 0.0
        noise = rng.standard_normal(x.shape).astype(np.float32) * config.arm.degrade_noise * rms
        noisy.append(jnp.asarray(x + noise, t.config.param_dtype))
    return t.replace(params=jax.tree.unflatten(tree, noisy), source=f"{t.source} + noise")


def _opd_degraded(ctx: ArmContext) -> loops.RunResult:
    base, teacher = ctx.models.base, degraded_teacher(ctx.models, ctx.config)
    return loops.run_opd(base.config, base.params, teacher.config, teacher.params, ctx.source,
                         _kl(ctx, 1.0), ctx.optim, ctx.loop, ctx.sampling, mesh=ctx.world.mesh,
                         loss_impl=ctx.config.loss_impl, lora=ctx.lora,
                         updates_per_batch=ctx.config.arm.updates_per_batch)  # fmt: skip


def _spectrum(ctx: ArmContext) -> loops.RunResult:
    """Spectrum Tuning (`jaxpost.spectrum`): sequences of `arm.spectrum_outputs` solutions of a
    problem after its prompt; as many output tokens per step as the SFT arm trains."""
    w, base, a = ctx.world, ctx.models.base, ctx.config.arm
    examples = spectrum.spectrum_examples(base.tokenizer, w.task, w.arm_problems,
                                          outputs=a.spectrum_outputs, per_problem=4,
                                          seed=w.config.seed + 7)  # fmt: skip
    width = data.pair_width(examples, inputs.PAD_MULTIPLE)
    if width > base.config.max_seq_len:
        raise UserError(f"spectrum: {a.spectrum_outputs} outputs per sequence make {width} "
                        f"tokens, more than the model's max_seq_len {base.config.max_seq_len}; "
                        f"lower arm.spectrum_outputs")  # fmt: skip
    rows = ctx.loop.batch_size * ctx.sampling.group_size
    loop = dataclasses.replace(ctx.loop, batch_size=max(1, rows // a.spectrum_outputs))
    return loops.run_sft(base.config, base.params, examples, ctx.optim, loop,
                         pad_id=base.tokenizer.pad_id, mesh=w.mesh,
                         loss_impl=ctx.config.loss_impl, lora=ctx.lora)  # fmt: skip


def _grpo(unlikely: bool = False) -> Callable[[ArmContext], loops.RunResult]:
    def build(ctx: ArmContext) -> loops.RunResult:
        base, group, beta = ctx.models.base, ctx.sampling.group_size, ctx.config.arm.beta_rank
        transform = None
        if unlikely:
            def transform(r, seq_logp):
                return np.asarray(losses.unlikeliness_rewards(
                    jnp.asarray(r), jnp.asarray(seq_logp), group, beta_rank=beta))  # fmt: skip
        a = ctx.config.arm
        return loops.run_grpo(base.config, base.params, ctx.source, ctx.optim, ctx.loop,
                              ctx.sampling, reward_transform=transform, mesh=ctx.world.mesh,
                              loss_impl=ctx.config.loss_impl, is_correction=True,
                              is_mode=a.is_mode, is_max=a.is_max, lora=ctx.lora,
                              num_iterations=a.updates_per_batch)  # fmt: skip

    return build


def _kl(ctx: ArmContext, alpha: float) -> opd.OPDLoss:
    return inputs.distillation_loss("kl", alpha=alpha)


def _opd(loss: Callable[[ArmContext], opd.OPDLoss]) -> Callable[[ArmContext], loops.RunResult]:
    def build(ctx: ArmContext) -> loops.RunResult:
        base, teacher = ctx.models.base, ctx.models.teacher
        return loops.run_opd(base.config, base.params, teacher.config, teacher.params, ctx.source,
                             loss(ctx), ctx.optim, ctx.loop, ctx.sampling, mesh=ctx.world.mesh,
                             loss_impl=ctx.config.loss_impl, lora=ctx.lora,
                             updates_per_batch=ctx.config.arm.updates_per_batch)  # fmt: skip

    return build


def _sampled_opd(with_reward: bool) -> Callable[[ArmContext], loops.RunResult]:
    """Sampled-token OPD (the tinker recipe): one teacher logprob per sampled token as a
    per-token advantage in GRPO's loss; `with_reward` adds the verifier's group advantage."""

    def build(ctx: ArmContext) -> loops.RunResult:
        base, teacher, a = ctx.models.base, ctx.models.teacher, ctx.config.arm
        return loops.run_sampled_opd(base.config, base.params, teacher.config, teacher.params,
                                     ctx.source, ctx.optim, ctx.loop, ctx.sampling,
                                     coef=a.sampled_coef, with_reward=with_reward,
                                     mesh=ctx.world.mesh, loss_impl=ctx.config.loss_impl,
                                     is_correction=True, is_mode=a.is_mode, is_max=a.is_max,
                                     lora=ctx.lora)  # fmt: skip

    return build


def _alpha_dpg(field: str) -> Callable[[ArmContext], loops.RunResult]:
    """α-DPG toward the base filtered by the verifier (`jaxpost.dpg`), α = `arm.<field>`."""

    def build(ctx: ArmContext) -> loops.RunResult:
        base, a = ctx.models.base, ctx.config.arm
        return loops.run_alpha_dpg(base.config, base.params, ctx.source, ctx.optim, ctx.loop,
                                   ctx.sampling, alpha=a[field], mesh=ctx.world.mesh,
                                   loss_impl=ctx.config.loss_impl, is_correction=True,
                                   is_mode=a.is_mode, is_max=a.is_max, lora=ctx.lora)  # fmt: skip

    return build


def _sparse_select(ctx: ArmContext) -> loops.RunResult:
    """ReasonMaxxer (`jaxpost.sparse_select`): one pool of base rollouts, A·CE at the base's
    high-entropy positions, KL to the base elsewhere."""
    base, a = ctx.models.base, ctx.config.arm
    sampling = dataclasses.replace(ctx.sampling, group_size=a.select_rollouts)
    loop = dataclasses.replace(ctx.loop, batch_size=max(
        1, ctx.loop.batch_size * ctx.sampling.group_size // a.select_rollouts))  # fmt: skip
    optim = dataclasses.replace(ctx.optim, learning_rate=a.select_learning_rate)
    return sparse_select.run(base.config, base.params, ctx.source, optim, loop, sampling,
                             tau=a.select_tau, kl_coef=a.select_kl, problems=a.select_problems,
                             keep=a.select_keep, epochs=a.select_epochs, mesh=ctx.world.mesh,
                             lora=ctx.lora)  # fmt: skip


def _ovd(ctx: ArmContext) -> loops.RunResult:
    """OVD (`jaxpost.ovd`): rollouts the teacher scores under `arm.ovd_threshold` (0-9: asked in
    words of a pretrained teacher, a proxy of a verbal score from the built-in one) replaced by
    its samples; GRPO on the verifier's reward."""
    w, base, teacher, a = ctx.world, ctx.models.base, ctx.models.teacher, ctx.config.arm
    scorer = None
    if settings.pretrained(ctx.config):  # a pretrained teacher reads text: ask it in words
        scorer = ovd.verbal_scorer(teacher.config, teacher.params, teacher.tokenizer,
                                   lambda i: w.task.render_prompt(w.arm_problems[i]))  # fmt: skip
    return ovd.run(base.config, base.params, teacher.config, teacher.params, ctx.source,
                   ctx.optim, ctx.loop, ctx.sampling, threshold=a.ovd_threshold, scorer=scorer,
                   mesh=ctx.world.mesh, loss_impl=ctx.config.loss_impl, lora=ctx.lora,
                   is_correction=True, is_mode=a.is_mode, is_max=a.is_max)  # fmt: skip


def _gad(ctx: ArmContext) -> loops.RunResult:
    """GAD (`jaxpost.gad`): a discriminator (the base plus a scalar head) learns teacher from
    student samples; GRPO on its score after a warm-up of `arm.gad_warmup_frac` of the steps."""
    base, teacher, a = ctx.models.base, ctx.models.teacher, ctx.config.arm
    if ctx.world.mesh is not None or ctx.lora is not None:
        raise UserError("the gad arm trains its discriminator beside the policy on one device "
                        "without LoRA: run it without --mesh and lora_rank")  # fmt: skip
    return gad.run(base.config, base.params, teacher.config, teacher.params, ctx.source,
                   ctx.optim, ctx.loop, ctx.sampling,
                   warmup=int(round(a.gad_warmup_frac * ctx.loop.steps)),
                   disc_lr_scale=a.gad_disc_lr_scale,
                   loss_impl=ctx.config.loss_impl, is_correction=True, is_mode=a.is_mode,
                   is_max=a.is_max)  # fmt: skip


def _qsharp(ctx: ArmContext) -> loops.RunResult:
    """Q♯ (`jaxpost.qsharp`): the base stays as it is; a value model (the base plus a scalar
    head) learns P(success | prefix) from the base's own rollouts with the arm's budget, and the
    arm's policy is the base decoded under its guidance (`RunResult.guide`)."""
    base, a = ctx.models.base, ctx.config.arm
    if ctx.lora is not None:
        raise UserError("the qsharp arm trains no policy weights: run it without lora_rank")
    optim = dataclasses.replace(ctx.optim, learning_rate=a.qsharp_learning_rate)
    r = qsharp.train_value(base.config, base.params, ctx.source, optim, ctx.loop,
                           ctx.sampling, mesh=ctx.world.mesh, loss_impl=ctx.config.loss_impl)  # fmt: skip
    guide = qsharp.Guide(base.config, r.params, top_k=a.qsharp_top_k, eta=a.qsharp_eta)
    return dataclasses.replace(r, params=base.params, guide=guide)


def opsd_teacher_texts(w: World) -> list[str]:
    """OPSD's teacher prompts: each training problem with a reference solution in context."""
    rng = np.random.default_rng([w.config.seed, 23])
    return [w.task.privileged_view(p, rng).teacher_prompt for p in w.arm_problems]


def _opsd(ctx: ArmContext) -> loops.RunResult:
    """The base is the teacher, seeing a reference solution in its prompt: frozen, or with
    `arm.opsd_teacher` the live policy or an EMA of it (`jaxpost.teachers`)."""
    w, base = ctx.world, ctx.models.base
    source = dataclasses.replace(ctx.source, teacher_prompts=inputs.encode_prompts(
        base, opsd_teacher_texts(w), max_new_tokens=ctx.sampling.max_new_tokens,
        what="OPSD teacher prompts"))  # fmt: skip
    a = ctx.config.arm
    return loops.run_opd(base.config, base.params, base.config, base.params, source,
                         _kl(ctx, 1.0), ctx.optim, ctx.loop, ctx.sampling, mesh=w.mesh,
                         loss_impl=ctx.config.loss_impl, lora=ctx.lora,
                         self_teacher=a.opsd_teacher, ema_decay=a.opsd_ema_decay,
                         updates_per_batch=a.updates_per_batch)  # fmt: skip


ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("sft", "SFT on dataset solutions drawn from the full solution set", "sft", False, _sft),
    Arm("grpo", "GRPO with the verifier's 0/1 reward", "rl", True, _grpo()),
    Arm("grpo_unlikely", "GRPO with He et al.'s unlikeliness reward (rank by base-policy "
        "logprob)", "rl", True, _grpo(unlikely=True)),
    Arm("opd_fkl", "OPD, forward KL(p_T || p_S) (alpha=0)", "distill", True,
        _opd(lambda c: _kl(c, 0.0))),
    Arm("opd_jsd", "OPD, generalized JSD (alpha=0.5)", "distill", True,
        _opd(lambda c: _kl(c, 0.5))),
    Arm("opd_rkl", "OPD, reverse KL(p_S || p_T) (alpha=1)", "distill", True,
        _opd(lambda c: _kl(c, 1.0))),
    Arm("opd_entropy", "entropy-aware OPD (reverse KL, forward KL where the teacher is "
        "uncertain)", "distill", True, _opd(lambda c: losses.entropy_aware_opd_kl())),
    Arm("opd_prefix", "prefix OPD (reverse KL on the first prefix_len completion tokens)",
        "distill", True, _opd(lambda c: losses.prefix_opd(_kl(c, 1.0), c.config.arm.prefix_len))),
    Arm("opsd", "OPSD: teacher = frozen base seeing a reference solution in its prompt",
        "distill", True, _opsd),
    Arm("opd_sampled", "sampled-token OPD as RL (tinker): advantage log p_T - log p_S of the "
        "sampled token, one teacher logprob per token", "distill_sampled", True,
        _sampled_opd(with_reward=False)),
    Arm("grpo_opd", "GRPO + sampled-token OPD: the verifier's group advantage plus the "
        "teacher's per-token one", "distill_sampled", True, _sampled_opd(with_reward=True)),
    Arm("sparse_select", "sparse policy selection (ReasonMaxxer, 2605.06241): one pool of base "
        "rollouts; A·CE of the rollout's token where the base's entropy > arm.select_tau, "
        "KL to the base elsewhere (ours: completion-only anchor, no curriculum order)", "rl",
        False, _sparse_select),
    Arm("sft_mild", "SFT at arm.sft_mild_lr_scale x the learning rate (a small step off the "
        "policy's states)", "sft", False, lambda c: _sft(c, "sft_mild_lr_scale")),
    Arm("sft_stress", "SFT at arm.sft_stress_lr_scale x the learning rate (a large step off the "
        "policy's states)", "sft", False, lambda c: _sft(c, "sft_stress_lr_scale")),
    Arm("opd_degraded", "reverse-KL OPD from the teacher weakened by weight noise "
        "(arm.degrade_noise x each tensor's RMS; evaluated as teacher_degraded)", "distill", True,
        _opd_degraded),
    Arm("spectrum", "Spectrum Tuning (2510.06084): SFT on the prompt followed by "
        "arm.spectrum_outputs i.i.d. draws from the full solution set, each closed by eos (ours: "
        "eos as the separator, the task prompt as the description)", "sft", False, _spectrum),
    Arm("ovd", "OVD (2601.21968): rollouts the teacher scores under arm.ovd_threshold replaced "
        "by its samples, GRPO on the outcome reward (ours: a pretrained teacher is asked for a digit; "
        "the built-in one's score is 9 x its geometric-mean token probability; whole "
        "trajectories replaced)",
        "distill_sampled", True, _ovd),
    Arm("gad", "GAD (2511.10643): black-box distillation, GRPO on a discriminator's score that "
        "learns teacher from student samples by Bradley-Terry, after an SFT warm-up on teacher "
        "samples (ours: the discriminator is the base plus a linear head; teacher responses "
        "sampled each step; the warm-up inside the arm's budget)", "rl", True, _gad),
    Arm("qsharp", "Q♯ (NeurIPS 2025): the frozen base decoded as π ∝ π_base·exp(Q) over its "
        "top arm.qsharp_top_k tokens, Q = log(1 − p + p·e^η) from a value model of P(success | "
        "prefix) trained on the base's rollouts; retention is the base's by construction (ours: "
        "the value model is the base plus a linear head, BCE at every prefix)", "rl", False,
        _qsharp),
    Arm("alpha_dpg", "alpha-DPG (2512.05962) toward the base filtered by the verifier, "
        "alpha = arm.dpg_alpha (mass-covering side; ours: GRPO's per-token surrogate)", "rl",
        True, _alpha_dpg("dpg_alpha")),
    Arm("alpha_dpg_seek", "alpha-DPG, alpha = arm.dpg_alpha_seek (mode-seeking side, toward "
        "reverse KL)", "rl", True, _alpha_dpg("dpg_alpha_seek")),
)}  # fmt: skip


def supervision_bits(kind: str, vocab: int, completion_len: float | None) -> float:
    """Supervision bits per trained token, the x of the report's central picture (a convention,
    for orders of magnitude): RL gets one 0/1 verdict per sampled sequence, at most 1 bit over
    its `completion_len` tokens; SFT one target token per token, log2 V bits; distillation a
    teacher distribution per token, counted as V - 1 probabilities of log2 V bits each;
    sampled-token distillation one teacher logprob of the sampled token per token, counted as
    log2 V bits (what SFT's target carries). NaN when an RL arm logged no completion length."""
    if kind == "rl":
        return 1.0 / completion_len if completion_len else float("nan")
    bits = float(np.log2(max(vocab, 2)))
    return bits if kind in ("sft", "distill_sampled") else (max(vocab, 2) - 1) * bits


def arm_names(config) -> tuple[str, ...]:
    """The arms `config.arms` lists (comma-separated; "all": the whole table), checked against
    the table."""
    names = tuple(a.strip() for a in str(config.arms).split(",") if a.strip())
    if names == ("all",):
        return tuple(ARMS)
    unknown = [a for a in names if a not in ARMS]
    if unknown or not names:
        raise UserError(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if len(set(names)) != len(names):
        raise UserError(f"arms repeat: {names}")
    return names


def run_arm(w: World, name: str, models: Models, log=print) -> loops.RunResult:
    """Train one arm from the base with the shared budget; resumes from its checkpoints."""
    c = w.config
    a = c.arm
    optim = train.OptimConfig(learning_rate=a.learning_rate, warmup_steps=min(5, a.steps),
                              total_steps=a.steps)  # fmt: skip
    loop = loops.LoopConfig(steps=a.steps, batch_size=a.prompts_per_step, seed=c.seed + 100,
                            progress=w.progress, desc=name,
                            workdir=os.path.join(c.workdir, "arms", name),
                            checkpoint_every=max(1, a.steps // 3))  # fmt: skip
    sampling = SamplingConfig(group_size=a.group_size, max_new_tokens=a.max_new_tokens,
                              temperature=a.temperature, top_p=a.top_p if a.top_p < 1 else None)  # fmt: skip
    base, tok = models.base, models.base.tokenizer
    prompts = inputs.encode_prompts(base, [w.task.render_prompt(p) for p in w.arm_problems],
                                    max_new_tokens=a.max_new_tokens, what="training prompts")  # fmt: skip

    def reward(i: int, completion) -> float:
        return float(w.task.verify_answer(w.arm_problems[i], tok.decode(completion)))

    source = PromptSource(prompts=prompts, reward=reward, eos_id=tok.eos_id, pad_id=tok.pad_id)
    adapters = lora.from_rank(c.lora_rank, c.lora_alpha)
    return ARMS[name].build(ArmContext(w, models, optim, loop, sampling, source, adapters))
