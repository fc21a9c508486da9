"""The training loops: one supervised loop (SFT) and one on-policy loop (GRPO, OPD, OPSD).

A loop owns the host side only: which examples or prompts a step sees, sampling, scoring,
logging, checkpointing, preemption. The arithmetic is in the jitted steps of `jaxpost.train`;
GRPO and OPD differ only in their objective and their scoring hook (rewards -> advantages, or a
teacher as a frozen input), so they share `run_on_policy`.

Determinism: the examples of step t, its prompts and the sampler's seed are functions of
(seed, t) alone, so a run restarted from its step-t checkpoint replays steps t+1... exactly as
the uninterrupted run would have.

Scale: every loop takes an optional `mesh` (`sharding.make_mesh`). The train state is then
sharded by the logical rules of `jaxpost.sharding` (FSDP/tensor parallel), each step's batch is
split over the mesh's data axes, a frozen model (teacher, reference) is sharded like the student,
the sampler splits its rows the same way, and everything runs under `jax.set_mesh(mesh)` so the
model's activation constraints apply. With several processes (one per host, `jaxpost.distributed`)
each process builds only the rows its devices hold (`distributed.local_rows`) and the global batch
is assembled without a transfer (`sharding.global_batch_from_local`); the arithmetic is the
one-process arithmetic on the same mesh. Process 0 writes the metrics; every process takes part
in checkpoints (orbax writes each host's shards).

The step loop never waits for a step's metrics: step t's are read after step t+1 is dispatched
(`metrics_log.DeferredMetrics`), so the host prepares the next batch while the device computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import data, distributed, dpg, rollouts, runner, teachers, train
from jaxpost import shaping as shaping_lib
from jaxpost.lora import LoraConfig
from jaxpost.models import ModelConfig
from jaxpost.on_policy import adapted, finish, mesh_context, run_on_policy
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig, RunResult, StepFunction
from jaxpost.shaping import Shaping
from jaxpost.teacher_service import TopkTeachers


def run_sft(
    config: ModelConfig,
    params,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    optim: train.OptimConfig,
    loop: LoopConfig,
    *,
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    loss_impl: str = "auto",
    pack: bool = False,
    lora: LoraConfig | None = None,
) -> RunResult:
    """Supervised fine-tuning on fixed (prompt, completion) token pairs, completion-only loss.

    Step t uses examples perm_e[(t·B) mod n ...] where perm_e is the permutation of epoch e drawn
    from (seed, e): every example once per epoch, a fixed order per seed. Rows are padded to one
    run-wide width (the longest example, rounded up to 16), so the step compiles once.
    With `pack`, a step is `loop.batch_size` rows of that width holding as many examples as fit
    (`data.pack_plan`, the same epoch order; each example keeps its own positions and attention),
    so padding costs far less; the `examples` metric counts a step's examples.
    `loss_impl`: `train.LOSS_IMPLS` ("auto": fused-linear cross-entropy at a large vocabulary).
    `lora`: train low-rank adapters on a frozen `params` (`jaxpost.lora`); the result's `params`
    are the merged model, its state holds the adapters.
    """
    if not examples:
        raise ValueError("run_sft needs at least one example")
    n = len(examples)
    width = data.pair_width(examples)
    if width > config.max_seq_len:
        raise ValueError(f"longest example ({width} tokens) exceeds max_seq_len {config.max_seq_len}")
    optimizer = train.make_optimizer(optim)
    step_fn, trained, frozen, model_params = adapted(
        config, params, train.sft_objective(config, loss_impl=loss_impl), optimizer,
        optim.grad_accum, mesh, lora, loop.seed)  # fmt: skip
    run = runner.Runner(loop, step_fn.init_state(trained, loop.seed))
    mine = distributed.local_rows(mesh, loop.batch_size)

    plan = None
    if pack:
        plan = data.pack_plan([len(p) + len(c) for p, c in examples], loop.batch_size, width,
                              loop.seed, loop.steps)  # fmt: skip

    def body(step: int) -> tuple[dict, dict]:
        if plan is not None:
            rows = plan[step - 1]
            batch = data.packed_sft_batch(examples, rows[mine], pad_id, width)
            extra = {"examples": float(sum(len(r) for r in rows))}
        else:
            idx = []
            for j in range((step - 1) * loop.batch_size, step * loop.batch_size):
                epoch, pos = divmod(j, n)
                perm = np.random.default_rng([loop.seed, epoch]).permutation(n)
                idx.append(int(perm[pos]))
            batch = data.sft_batch([examples[i] for i in idx[mine]], pad_id, length=width)
            extra = {}
        run.last_batch = batch
        run.state, metrics = step_fn(run.state, batch, *frozen)
        return metrics, extra

    with mesh_context(mesh):
        return finish(run.iterate(body), model_params)


# ---------------------------------------------------------------------------------------------
# on-policy: GRPO and OPD share the loop; they differ in objective and scoring


def _rl_hooks(config, source, sampling, loop, shaping, mesh, advantage_scale, reward_transform,
              advantage_fn=None):  # fmt: skip
    """(collect, score) of the reward-driven loops: `shaping.collect` and `shaping.grpo_batch`."""
    shaping = shaping or Shaping()
    shaping.check_budget(sampling.max_new_tokens)

    def collect(params, step):
        return shaping_lib.collect(config, params, source, sampling, shaping,
                                   batch_size=loop.batch_size, seed=loop.seed, step=step,
                                   mesh=mesh)  # fmt: skip

    def score(r: rollouts.StepRollouts):
        return shaping_lib.grpo_batch(source, r, sampling, shaping,
                                      advantage_scale=advantage_scale,
                                      reward_transform=reward_transform,
                                      advantage_fn=advantage_fn)  # fmt: skip

    return collect, score


def run_grpo(
    config: ModelConfig,
    params,
    source: PromptSource,
    optim: train.OptimConfig,
    loop: LoopConfig,
    sampling: SamplingConfig,
    *,
    ref_params=None,
    num_iterations: int = 1,
    reward_transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    advantage_scale: str = "group",
    shaping: Shaping | None = None,
    mesh: jax.sharding.Mesh | None = None,
    loss_impl: str = "auto",
    lora: LoraConfig | None = None,
    **loss_kwargs: Any,
) -> RunResult:
    """GRPO / RLVR: sample groups, verify, group-normalised advantages, clipped policy gradient.

    Args:
      source: prompts and the verifier reward.
      ref_params: the frozen reference policy of the KL penalty (needed when kl_beta > 0).
      num_iterations: optimisation passes over each rollout batch.
      reward_transform: (rewards [N], sequence logprobs [N]) -> rewards, e.g. He et al.'s
        unlikeliness reward via `losses.unlikeliness_rewards`.
      shaping: `shaping.Shaping`: dynamic sampling, truncation masking, overlong penalty,
        high-entropy token mask (default: none of them).
      loss_impl: `train.LOSS_IMPLS`, the policy's (and reference's) logprobs' path.
      lora: train low-rank adapters (`run_on_policy`).
      loss_kwargs: forwarded to `objectives.grpo_objective` (is_correction, entropy_coef) and
        `losses.grpo_loss` (loss_type, eps_low, eps_high, kl_beta, ...).
    """
    if source.reward is None:
        raise ValueError("run_grpo needs a PromptSource with a reward function")
    if loss_kwargs.get("kl_beta", 0.0) > 0 and ref_params is None:
        raise ValueError("kl_beta > 0 needs ref_params (the frozen reference policy)")
    with_ref = ref_params is not None and loss_kwargs.get("kl_beta", 0.0) > 0
    objective = train.grpo_objective(config, loss_impl=loss_impl, with_reference=with_ref,
                                     **loss_kwargs)  # fmt: skip
    collect, score = _rl_hooks(config, source, sampling, loop, shaping, mesh, advantage_scale,
                               reward_transform)  # fmt: skip
    return run_on_policy(config, params, source, objective, score, optim, loop, sampling,
                         frozen=[(config, ref_params)] if with_ref else [],
                         updates_per_batch=num_iterations, mesh=mesh, collect=collect,
                         lora=lora)  # fmt: skip


def run_alpha_dpg(
    config: ModelConfig,
    params,
    source: PromptSource,
    optim: train.OptimConfig,
    loop: LoopConfig,
    sampling: SamplingConfig,
    *,
    alpha: float,
    clip: float = dpg.DEFAULT_CLIP,
    shaping: Shaping | None = None,
    mesh: jax.sharding.Mesh | None = None,
    loss_impl: str = "auto",
    lora: LoraConfig | None = None,
    **loss_kwargs: Any,
) -> RunResult:
    """α-DPG (`jaxpost.dpg`): toward the starting policy `params` filtered by the verifier, by
    REINFORCE on the pseudo-reward (a·b/(Ẑπ))^(1-α) - 1 with a leave-one-out baseline, in
    GRPO's surrogate (`loss_kwargs` as for `run_grpo`). The frozen start (a) scores every
    rollout in a forward pass of its own before the step. One process (the base's logprobs of
    this host's rows are computed on the host's arrays)."""
    dpg.check_alpha(alpha)
    if source.reward is None:
        raise ValueError("run_alpha_dpg needs a PromptSource with a reward function (b)")
    if jax.process_count() > 1:
        raise ValueError("run_alpha_dpg runs in one process")
    base_logprobs = train.jitted_completion_logprobs(config, loss_impl)
    G = sampling.group_size

    def advantage_fn(r: rollouts.StepRollouts, rewards: np.ndarray):
        b = r.batch
        mask = np.asarray(b.completion_mask, np.float32)
        base = (np.asarray(base_logprobs(params, jax.tree.map(jnp.asarray, b))) * mask).sum(1)
        return dpg.advantages((np.asarray(b.old_logp) * mask).sum(1), base, rewards, G,
                              alpha=alpha, clip=clip)  # fmt: skip

    objective = train.grpo_objective(config, loss_impl=loss_impl, **loss_kwargs)
    collect, score = _rl_hooks(config, source, sampling, loop, shaping, mesh, "none", None,
                               advantage_fn)  # fmt: skip
    return run_on_policy(config, params, source, objective, score, optim, loop, sampling,
                         mesh=mesh, collect=collect, lora=lora)


def run_sampled_opd(
    config: ModelConfig,
    params,
    teacher_config: ModelConfig,
    teacher_params,
    source: PromptSource,
    optim: train.OptimConfig,
    loop: LoopConfig,
    sampling: SamplingConfig,
    *,
    coef: float = 1.0,
    with_reward: bool = False,
    advantage_scale: str = "group",
    shaping: Shaping | None = None,
    mesh: jax.sharding.Mesh | None = None,
    loss_impl: str = "auto",
    lora: LoraConfig | None = None,
    **loss_kwargs: Any,
) -> RunResult:
    """Sampled-token on-policy distillation as RL (the tinker-cookbook recipe): the teacher
    scores only the sampled token, and each token's advantage is

        A_t = coef · (log π_T(y_t) − log π_S(y_t))  [+ the group advantage of the task reward]

    (`opd.reverse_kl_token_advantages`; one teacher logprob per token, the sampled estimate of
    the reverse KL's gradient) in GRPO's clipped loss. `with_reward` adds the verifier's group
    advantages (GRPO + distillation); without it the reward is only logged. The teacher sees
    `source.teacher_prompts` when set (a privileged view). `loss_kwargs` as for `run_grpo`.
    """
    if with_reward and source.reward is None:
        raise ValueError("with_reward needs a PromptSource with a reward function")
    objective = train.sampled_opd_objective(config, teacher_config, coef=coef,
                                            loss_impl=loss_impl, **loss_kwargs)  # fmt: skip
    if source.reward is not None:
        collect, score = _rl_hooks(config, source, sampling, loop, shaping, mesh,
                                   advantage_scale, None)  # fmt: skip
    else:
        collect, score = None, lambda r: (r.batch, {})

    def scored(r: rollouts.StepRollouts):
        batch, extra = score(r)
        if not with_reward:
            batch = batch.replace(advantages=np.zeros(batch.rows, np.float32))
        return batch, extra

    return run_on_policy(config, params, source, objective, scored, optim, loop, sampling,
                         frozen=[(teacher_config, teacher_params)], mesh=mesh, collect=collect,
                         lora=lora)  # fmt: skip


def run_opd(
    config: ModelConfig,
    params,
    teacher_config: ModelConfig,
    teacher_params,
    source: PromptSource,
    loss_fn,
    optim: train.OptimConfig,
    loop: LoopConfig,
    sampling: SamplingConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
    loss_impl: str = "auto",
    teacher_topk: int | TopkTeachers = 0,
    lora: LoraConfig | None = None,
    self_teacher: str = "frozen",
    ema_decay: float = 0.99,
    updates_per_batch: int = 1,
) -> RunResult:
    """On-policy distillation: the student samples, the teacher scores every token of it.

    `loss_fn` is `losses.opd_kl(alpha, ...)` or a variant. With `source.teacher_prompts` set this
    is OPSD: the teacher (typically the frozen initial student) sees a privileged prompt. With a
    reward in `source` the rollouts' pass rate is logged. `loss_impl`: `train.LOSS_IMPLS` (the
    fused-linear path computes the divergence from both models' hidden states and heads).

    `teacher_topk` = k > 0: a top-k teacher (`jaxpost.teachers`): after sampling, the teacher's
    own jitted program scores the batch once (its k most likely ids per token, their logprobs and
    a tail bucket) and the student's step distils from those k + 1 numbers a token, holding no
    teacher parameters; `loss_fn` must then be `opd_kl(alpha)` (its alpha and temperature are
    used). The teacher is scored on the student's mesh; a `teacher_service.TopkTeachers` instead
    of k gives several teachers, their own devices, a score cache or a different tokenizer
    (`teacher_config`/`teacher_params` are then unused).

    `self_teacher` (`teachers.SELF_TEACHERS`; the teacher must be the student's own model, as in
    OPSD): "frozen" distils from `teacher_params` as given; "live" from the current policy;
    "ema" from an exponential moving average of it (`ema_decay`, kept in the optimizer state).

    `updates_per_batch`: optimizer steps on each batch of rollouts and teacher scores (after the
    first, the rollouts are one update off the policy; the loss has no ratio to correct it).
    """
    if self_teacher not in teachers.SELF_TEACHERS:
        raise ValueError(f"self_teacher must be one of {teachers.SELF_TEACHERS}, got "
                         f"{self_teacher!r}")  # fmt: skip
    if self_teacher != "frozen" and (teacher_topk or teacher_config != config):
        raise ValueError("a live or EMA self-teacher is the student's own model (OPSD): give "
                         "teacher_config = config and no teacher_topk")  # fmt: skip
    if self_teacher == "ema" and (lora is not None or mesh is not None):
        raise ValueError("an EMA self-teacher runs without LoRA and without a mesh (not yet)")
    service = None
    if teacher_topk:
        if getattr(loss_fn, "kind", None) != "kl" or getattr(loss_fn, "prefix_len", None):
            raise ValueError("teacher_topk needs loss_fn = opd_kl(alpha) (no entropy-aware or "
                             f"prefix variant), got {loss_fn!r}")  # fmt: skip
        service = teacher_topk
        if not isinstance(service, TopkTeachers):
            service = TopkTeachers([(teacher_config, teacher_params)], int(teacher_topk),
                                   temperature=loss_fn.temperature, loss_impl=loss_impl,
                                   mesh=mesh)  # fmt: skip
        if service.tokenizers is None and service.vocab_size != config.vocab_size:
            raise ValueError("teacher and student vocabularies differ; a top-k teacher's ids "
                             "index the student's vocabulary (give TopkTeachers the two "
                             "tokenizers to distil across them)")  # fmt: skip
        if service.temperature != loss_fn.temperature:
            raise ValueError(f"the teachers' temperature {service.temperature} differs from the "
                             f"loss's {loss_fn.temperature}")  # fmt: skip
        objective = teachers.topk_opd_objective(config, alpha=loss_fn.alpha,
                                                temperature=loss_fn.temperature,
                                                loss_impl=loss_impl)  # fmt: skip
        frozen = []
    else:
        objective = train.opd_objective(config, teacher_config, loss_fn, loss_impl=loss_impl)
        frozen = [(teacher_config, teacher_params)]
    extra = dict(extra_transform=None, frozen_from_state=None)
    if self_teacher == "live":
        objective, frozen = teachers.live_teacher(objective), []
    elif self_teacher == "ema":
        extra = dict(extra_transform=teachers.ema_tracker(ema_decay),
                     # a copy: the state is donated to the step that also reads the teacher
                     frozen_from_state=lambda state: (jax.tree.map(
                         jnp.copy, teachers.ema_of(state.opt_state)),))  # fmt: skip
        frozen = []

    def score(r: rollouts.StepRollouts):
        extra, batch = {}, r.batch
        if source.reward is not None:
            ok = rollouts.rewards(source, r) > 0
            totals = np.asarray(distributed.all_hosts(np.asarray([[ok.sum(), len(ok)]],
                                                                 np.float64))).sum(0)  # fmt: skip
            extra["pass_rate"] = totals[0] / totals[1]
        if service is not None:
            top, aligned, metrics = service(batch, r.problems)
            batch = batch.replace(teacher_topk=top)
            if aligned is not None:
                batch = batch.replace(loss_mask=np.asarray(batch.trained_mask()) * aligned)
            extra.update(metrics)
        return batch, extra

    return run_on_policy(config, params, source, objective, score, optim, loop, sampling,
                         frozen=frozen, updates_per_batch=updates_per_batch, mesh=mesh, lora=lora,
                         **extra)  # fmt: skip


__all__ = ["LoopConfig", "LoraConfig", "PromptSource", "RunResult", "SamplingConfig", "Shaping", "StepFunction",
           "TopkTeachers", "run_grpo", "run_on_policy", "run_opd", "run_sampled_opd", "run_sft"]  # fmt: skip
