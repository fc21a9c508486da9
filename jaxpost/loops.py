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

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxpost import data, distributed, losses, rollouts, sharding, train
from jaxpost.checkpoint import Checkpointer, PreemptionGuard, sync_should_stop
from jaxpost.metrics_log import DeferredMetrics, MetricsWriter
from jaxpost.models import ModelConfig
from jaxpost.rollouts import PromptSource, SamplingConfig


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long a loop runs and what it writes (sampling settings: `rollouts.SamplingConfig`).

    Attributes:
      steps: optimizer updates (on-policy: rollout rounds; each may make several updates).
      batch_size: examples per step (SFT) or prompts per step (on-policy).
      seed: the run's seed; every random choice derives from it and the step.
      workdir: metrics.jsonl, TensorBoard events and checkpoints/ go here (None: no files).
      checkpoint_every: save every this many steps (0: only at the end and on preemption).
      keep_checkpoints: how many checkpoints to keep.
      log_every: metrics-file and progress-bar interval.
      progress: show a tqdm bar (process 0).
      desc: label of the progress bar.
    """

    steps: int = 100
    batch_size: int = 16
    seed: int = 0
    workdir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    desc: str = "train"

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")


@dataclasses.dataclass
class RunResult:
    """What a loop returns: the final state and every logged row of metrics."""

    state: train.TrainState
    history: list[dict]
    preempted: bool = False
    last_batch: Any = None  # this process's rows of the final step's batch (state locality)


class StepFunction:
    """A loop's one jitted step, on one device or sharded over a mesh.

    `jax.jit` with explicit in/out shardings and a donated state, compiled at the first batch
    (when the batch's fields are known). On a mesh the state is placed by
    `train.state_shardings`, frozen models (teacher, reference) by their parameter shardings,
    and each batch is assembled from this process's rows over the data axes.
    """

    def __init__(self, step: Callable, config: ModelConfig, optimizer, mesh=None):
        self.step, self.config, self.optimizer, self.mesh = step, config, optimizer, mesh
        self._fn = None
        self._frozen_sh: tuple = ()

    def init_state(self, params, seed: int) -> train.TrainState:
        state = train.init_state(params, self.optimizer, seed)
        if self.mesh is None:
            return state
        return jax.device_put(state, train.state_shardings(self.config, self.mesh, self.optimizer))

    def place_frozen(self, config: ModelConfig, params):
        """Place one frozen model (in the order the step takes them)."""
        if self.mesh is None:
            return params
        shardings = sharding.param_shardings(config, self.mesh)
        self._frozen_sh += (shardings,)
        return sharding.shard_params(params, shardings)

    def __call__(self, state, batch, *frozen):
        if self.mesh is None:
            batch = jax.tree.map(jnp.asarray, batch)
            if self._fn is None:
                self._fn = train.jit_step(self.step)
            return self._fn(state, batch, *frozen)
        batch = sharding.global_batch_from_local(batch, self.mesh)
        if self._fn is None:
            self._fn = train.jit_step(
                self.step, state_sharding=jax.tree.map(lambda x: x.sharding, state),
                batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
                frozen_sharding=self._frozen_sh,
            )  # fmt: skip
        return self._fn(state, batch, *frozen)


class _Run:
    """Checkpoint resume, deferred metric logging, preemption and the progress bar around a
    step loop (`iterate`)."""

    def __init__(self, loop: LoopConfig, state: train.TrainState):
        self.loop = loop
        self.history: list[dict] = []
        writer = loop.workdir and distributed.is_writer()
        self.writer = MetricsWriter(loop.workdir) if writer else None
        self.ckpt = None
        self.state = state
        if loop.workdir:
            self.ckpt = Checkpointer(os.path.join(loop.workdir, "checkpoints"),
                                     max_to_keep=loop.keep_checkpoints)  # fmt: skip
            if self.ckpt.latest_step() is not None:
                abstract = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
                )
                self.state, _ = self.ckpt.restore(abstract)
        self.start = int(self.state.step)
        self.last_batch = None

    def _log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        if self.writer is not None and (step % self.loop.log_every == 0 or step == self.loop.steps):
            self.writer.write(step, metrics)

    def _save(self, step: int, force: bool = False) -> None:
        every = self.loop.checkpoint_every
        if self.ckpt is not None and (force or (every and step % every == 0)):
            self.ckpt.save(step, self.state, force=True)

    def iterate(self, body: Callable[[int], tuple[dict, dict]]) -> RunResult:
        """Run `body(step) -> (device metrics, host metrics)` for the remaining steps (1-based).

        Step t's device metrics are fetched once step t+1 has been dispatched, then logged with
        its host metrics and the wall time per step.
        """
        loop = self.loop
        preempted = False
        deferred = DeferredMetrics()
        host: dict[int, tuple[dict, float]] = {}
        show = loop.progress and distributed.is_writer()
        bar = tqdm(total=loop.steps, initial=self.start, desc=loop.desc, disable=not show,
                   dynamic_ncols=True, leave=False)  # fmt: skip

        def emit(done) -> None:
            if done is None:
                return
            step, device_metrics = done
            extra, elapsed = host.pop(step)
            metrics = {**device_metrics, **extra, "step_seconds": elapsed}
            self._log(step, metrics)
            bar.update(1)
            if step % loop.log_every == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]})

        with PreemptionGuard() as guard:
            try:
                last = time.perf_counter()
                for step in range(self.start + 1, loop.steps + 1):
                    device_metrics, extra = body(step)
                    now = time.perf_counter()
                    host[step] = (extra, now - last)
                    last = now
                    emit(deferred.push(step, device_metrics))
                    if sync_should_stop(guard.should_stop):
                        emit(deferred.flush())
                        self._save(step, force=True)
                        preempted = True
                        break
                    if self.ckpt is not None and (step == loop.steps or (
                            loop.checkpoint_every and step % loop.checkpoint_every == 0)):  # fmt: skip
                        emit(deferred.flush())  # a checkpoint syncs with the device anyway
                    self._save(step, force=step == loop.steps)
                emit(deferred.flush())
            finally:
                bar.close()
                if self.ckpt is not None:
                    self.ckpt.wait()
                    self.ckpt.close()
                if self.writer is not None:
                    self.writer.close()
        return RunResult(state=self.state, history=self.history, preempted=preempted,
                         last_batch=self.last_batch)  # fmt: skip


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# SFT


def run_sft(
    config: ModelConfig,
    params,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    optim: train.OptimConfig,
    loop: LoopConfig,
    *,
    pad_id: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> RunResult:
    """Supervised fine-tuning on fixed (prompt, completion) token pairs, completion-only loss.

    Step t uses examples perm_e[(t·B) mod n ...] where perm_e is the permutation of epoch e drawn
    from (seed, e): every example once per epoch, a fixed order per seed. Rows are padded to one
    run-wide width (the longest example, rounded up to 16), so the step compiles once.
    """
    if not examples:
        raise ValueError("run_sft needs at least one example")
    n = len(examples)
    width = data.round_up(max(len(p) + len(c) for p, c in examples), 16)
    if width > config.max_seq_len:
        raise ValueError(f"longest example ({width} tokens) exceeds max_seq_len {config.max_seq_len}")
    optimizer = train.make_optimizer(optim)
    step_fn = StepFunction(train.make_step(train.sft_objective(config), optimizer,
                                           grad_accum=optim.grad_accum), config, optimizer, mesh)  # fmt: skip
    run = _Run(loop, step_fn.init_state(params, loop.seed))
    mine = distributed.local_rows(mesh, loop.batch_size)

    def body(step: int) -> tuple[dict, dict]:
        idx = []
        for j in range((step - 1) * loop.batch_size, step * loop.batch_size):
            epoch, pos = divmod(j, n)
            perm = np.random.default_rng([loop.seed, epoch]).permutation(n)
            idx.append(int(perm[pos]))
        batch = data.sft_batch([examples[i] for i in idx[mine]], pad_id, length=width)
        run.last_batch = batch
        run.state, metrics = step_fn(run.state, batch)
        return metrics, {}

    with _mesh_context(mesh):
        return run.iterate(body)


# ---------------------------------------------------------------------------------------------
# on-policy: GRPO and OPD share the loop; they differ in objective and scoring


Score = Callable[[rollouts.StepRollouts], tuple[data.CompletionBatch, dict]]


def run_on_policy(
    config: ModelConfig,
    params,
    source: PromptSource,
    objective: train.Objective,
    score: Score,
    optim: train.OptimConfig,
    loop: LoopConfig,
    sampling: SamplingConfig,
    *,
    frozen: Sequence[tuple[ModelConfig, Any]] = (),
    updates_per_batch: int = 1,
    mesh: jax.sharding.Mesh | None = None,
) -> RunResult:
    """The on-policy loop: sample the step's prompts with the current policy, score them on the
    host, take `updates_per_batch` optimizer steps on the batch.

    Args:
      objective: `(params, batch, *frozen_params) -> (loss, aux)` from `jaxpost.train`.
      score: (this process's rollouts) -> (the training batch, host metrics to log): where GRPO
        turns rewards into advantages; OPD only logs the rollouts' pass rate.
      frozen: (config, params) of each model the objective takes after the batch (a teacher, a
        reference policy): inputs of the step, sharded like a student, never trained or saved.
      updates_per_batch: optimisation passes over each batch (PPO-style; old logprobs are the
        sampler's, i.e. those of the policy that generated the batch).
    """
    rows = loop.batch_size * sampling.group_size
    if mesh is not None and rows % sharding.data_parallel_size(mesh):
        raise ValueError(f"{loop.batch_size} prompts x {sampling.group_size} samples = {rows} rows "
                         f"do not split over the mesh's data-parallel size "
                         f"{sharding.data_parallel_size(mesh)}")  # fmt: skip
    optimizer = train.make_optimizer(optim)
    step_fn = StepFunction(train.make_step(objective, optimizer, grad_accum=optim.grad_accum),
                           config, optimizer, mesh)  # fmt: skip
    frozen_params = tuple(step_fn.place_frozen(c, p) for c, p in frozen)
    run = _Run(loop, step_fn.init_state(params, loop.seed))

    def body(step: int) -> tuple[dict, dict]:
        start = time.perf_counter()
        r = rollouts.sample_step(config, run.state.params, source, sampling,
                                 batch_size=loop.batch_size, seed=loop.seed, step=step, mesh=mesh)  # fmt: skip
        batch, extra = score(r)
        run.last_batch = batch
        for _ in range(updates_per_batch):
            run.state, metrics = step_fn(run.state, batch, *frozen_params)
        roll = rollouts.rollout_metrics(r)
        roll["sampled_tokens_per_s"] = roll["sampled_tokens"] / max(time.perf_counter() - start,
                                                                    1e-9)  # fmt: skip
        return metrics, {**extra, **roll}

    with _mesh_context(mesh):
        return run.iterate(body)


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
    mesh: jax.sharding.Mesh | None = None,
    **loss_kwargs: Any,
) -> RunResult:
    """GRPO / RLVR: sample groups, verify, group-normalised advantages, clipped policy gradient.

    Args:
      source: prompts and the verifier reward.
      ref_params: the frozen reference policy of the KL penalty (needed when kl_beta > 0).
      num_iterations: optimisation passes over each rollout batch.
      reward_transform: (rewards [N], sequence logprobs [N]) -> rewards, e.g. He et al.'s
        unlikeliness reward via `losses.unlikeliness_rewards`.
      loss_kwargs: forwarded to `losses.grpo_loss` (loss_type, eps_low, eps_high, kl_beta, ...).
    """
    if source.reward is None:
        raise ValueError("run_grpo needs a PromptSource with a reward function")
    if loss_kwargs.get("kl_beta", 0.0) > 0 and ref_params is None:
        raise ValueError("kl_beta > 0 needs ref_params (the frozen reference policy)")
    group = sampling.group_size
    with_ref = ref_params is not None and loss_kwargs.get("kl_beta", 0.0) > 0
    objective = train.grpo_objective(config, with_reference=with_ref, **loss_kwargs)

    def score(r: rollouts.StepRollouts):
        correct = rollouts.rewards(source, r)
        rewards = correct
        batch = r.batch
        if reward_transform is not None:
            seq_logp = (batch.old_logp * batch.completion_mask).sum(1)
            rewards = np.asarray(reward_transform(correct, seq_logp), np.float32)
        adv, _ = losses.group_advantages(jnp.asarray(rewards), group, scale=advantage_scale)
        totals = np.asarray(distributed.all_hosts(np.asarray(
            [[rewards.sum(), (correct > 0).sum(), len(rewards)]], np.float64))).sum(0)  # fmt: skip
        extra = {"reward": totals[0] / totals[2], "pass_rate": totals[1] / totals[2]}
        return batch.replace(advantages=np.asarray(adv)), extra

    return run_on_policy(config, params, source, objective, score, optim, loop, sampling,
                         frozen=[(config, ref_params)] if with_ref else [],
                         updates_per_batch=num_iterations, mesh=mesh)  # fmt: skip


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
) -> RunResult:
    """On-policy distillation: the student samples, the teacher scores every token of it.

    `loss_fn` is `losses.opd_kl(alpha, ...)` or a variant. With `source.teacher_prompts` set this
    is OPSD: the teacher (typically the frozen initial student) sees a privileged prompt. With a
    reward in `source` the rollouts' pass rate is logged.
    """
    objective = train.opd_objective(config, teacher_config, loss_fn)

    def score(r: rollouts.StepRollouts):
        extra = {}
        if source.reward is not None:
            ok = rollouts.rewards(source, r) > 0
            totals = np.asarray(distributed.all_hosts(np.asarray([[ok.sum(), len(ok)]],
                                                                 np.float64))).sum(0)  # fmt: skip
            extra["pass_rate"] = totals[0] / totals[1]
        return r.batch, extra

    return run_on_policy(config, params, source, objective, score, optim, loop, sampling,
                         frozen=[(teacher_config, teacher_params)], mesh=mesh)  # fmt: skip


__all__ = ["LoopConfig", "PromptSource", "RunResult", "SamplingConfig", "StepFunction",
           "run_grpo", "run_on_policy", "run_opd", "run_sft"]  # fmt: skip
