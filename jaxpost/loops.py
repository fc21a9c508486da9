"""The training loops of the three paradigms: SFT, GRPO and on-policy distillation.

Each loop owns the host side only: which prompts a step sees, calling the sampler, verifying,
logging and checkpointing. The arithmetic is in the jitted steps of `jaxpost.train`.

Determinism: the prompts of step t, the sampler's seed at step t and the SFT batch at step t are
functions of (seed, t) alone, so a run restarted from its step-t checkpoint replays steps t+1...
exactly as the uninterrupted run would have.

Scale: every loop takes an optional `mesh` (`sharding.make_mesh`). With it the train state is
sharded by the logical rules of `jaxpost.sharding` (FSDP/tensor parallel), each step's batch is
split over the mesh's data axes, a teacher is sharded like a student, the sampler shards its rows
the same way, and the step runs under the mesh so the model's activation constraints apply. The
arithmetic is the one-device arithmetic (tests/test_loops.py checks the two agree); the batch
(SFT examples, or prompts × group size) must divide by the data-parallel size. This is the
single-controller path (one process driving all local devices: a GPU node, a TPU VM); multi-host
runs build global batches with `sharding.global_batch_from_local` instead.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxpost import data, losses, sampler, sharding, train
from jaxpost.checkpoint import Checkpointer, PreemptionGuard, sync_should_stop
from jaxpost.metrics_log import MetricsWriter
from jaxpost.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What every loop shares.

    Attributes:
      steps: optimizer updates (GRPO: rollout rounds; each may make several updates).
      batch_size: prompts per step (SFT: examples per step).
      group_size: samples per prompt (GRPO group / OPD rollouts per prompt).
      max_new_tokens: completion budget of the sampler.
      temperature, top_k, top_p: sampling settings of the rollouts.
      seed: the run's seed; every random choice derives from it and the step.
      workdir: metrics.jsonl, TensorBoard events and checkpoints/ go here (None: no files).
      checkpoint_every: save every this many steps (0: only at the end and on preemption).
      keep_checkpoints: how many checkpoints to keep.
      log_every: progress-bar refresh and metrics write interval.
      progress: show a tqdm bar.
      desc: label of the progress bar.
    """

    steps: int = 100
    batch_size: int = 16
    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    workdir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    desc: str = "train"

    def __post_init__(self):
        for name in ("steps", "batch_size", "group_size", "max_new_tokens", "log_every"):
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
    last_batch: dict | None = None  # host arrays of the final step's batch (state locality)


class _Run:
    """Checkpoint resume, metric logging, preemption and the progress bar around a step loop."""

    def __init__(self, loop: LoopConfig, state: train.TrainState, state_sharding=None):
        self.loop = loop
        self.history: list[dict] = []
        self.writer = MetricsWriter(loop.workdir) if loop.workdir else None
        self.ckpt = None
        self.state = state
        if loop.workdir:
            self.ckpt = Checkpointer(
                os.path.join(loop.workdir, "checkpoints"), max_to_keep=loop.keep_checkpoints
            )
            if self.ckpt.latest_step() is not None:
                abstract = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
                )
                self.state, _ = self.ckpt.restore(abstract)
        self.start = int(self.state.step)
        self.last_batch: dict | None = None

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.writer is not None and (step % self.loop.log_every == 0 or step == self.loop.steps):
            self.writer.write(step, {k: v for k, v in row.items() if k != "step"})

    def maybe_save(self, step: int, force: bool = False) -> None:
        if self.ckpt is None:
            return
        every = self.loop.checkpoint_every
        if force or (every and step % every == 0):
            self.ckpt.save(step, self.state, force=True)

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.wait()
            self.ckpt.close()
        if self.writer is not None:
            self.writer.close()

    def iterate(self, body: Callable[[int], dict]) -> RunResult:
        """Run `body(step)` for the remaining steps (1-based), handling everything around it."""
        loop = self.loop
        preempted = False
        bar = tqdm(
            total=loop.steps, initial=self.start, desc=loop.desc, disable=not loop.progress,
            dynamic_ncols=True, leave=False,
        )  # fmt: skip
        with PreemptionGuard() as guard:
            try:
                for step in range(self.start + 1, loop.steps + 1):
                    metrics = body(step)
                    self.log(step, metrics)
                    bar.update(1)
                    if step % loop.log_every == 0:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]})
                    if sync_should_stop(guard.should_stop):
                        self.maybe_save(step, force=True)
                        preempted = True
                        break
                    self.maybe_save(step, force=step == loop.steps)
            finally:
                bar.close()
                self.close()
        return RunResult(state=self.state, history=self.history, preempted=preempted,
                         last_batch=self.last_batch)  # fmt: skip


class _Compiled:
    """The jitted step of a loop, on one device or sharded over a mesh.

    On a mesh the state is placed by `train.state_shardings` before the checkpoint restore (so a
    restored state lands on the same shardings), the frozen model (teacher) by its own parameter
    shardings, and each batch over the data axes; the step is compiled on the first batch, when
    the batch's keys are known.
    """

    def __init__(self, step, config: ModelConfig, optimizer, mesh=None):
        self.step, self.config, self.optimizer, self.mesh = step, config, optimizer, mesh
        self._fn = None if mesh is not None else train.jit_step(step)
        self._frozen_sh = None

    def place_state(self, state: train.TrainState) -> train.TrainState:
        if self.mesh is None:
            return state
        return jax.device_put(state, train.state_shardings(self.config, self.mesh, self.optimizer))

    def place_frozen(self, config: ModelConfig, params):
        """Shard the frozen third argument of the step (OPD's teacher)."""
        if self.mesh is None:
            return params
        self._frozen_sh = sharding.param_shardings(config, self.mesh)
        return sharding.shard_params(params, self._frozen_sh)

    def __call__(self, state, batch: dict, *frozen):
        if self.mesh is None:
            return self._fn(state, jax.tree.map(jnp.asarray, batch), *frozen)
        batch = sharding.shard_batch(batch, self.mesh)
        if self._fn is None:
            self._fn = train.jit_step(
                self.step, state_sharding=jax.tree.map(lambda x: x.sharding, state),
                batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
                frozen_sharding=self._frozen_sh,
            )  # fmt: skip
        return self._fn(state, batch, *frozen)


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
    from (seed, e): every example once per epoch, a fixed order per seed.
    """
    if not examples:
        raise ValueError("run_sft needs at least one example")
    n = len(examples)
    width = data.round_up(max(len(p) + len(c) for p, c in examples), 16)
    if width > config.max_seq_len:
        raise ValueError(f"longest example ({width} tokens) exceeds max_seq_len {config.max_seq_len}")
    optimizer = train.make_optimizer(optim)
    step_fn = _Compiled(
        train.make_step(train.sft_objective(config), optimizer, grad_accum=optim.grad_accum),
        config, optimizer, mesh,
    )  # fmt: skip
    run = _Run(loop, step_fn.place_state(train.init_state(params, optimizer, loop.seed)))

    def body(step: int) -> dict:
        idx = []
        for j in range((step - 1) * loop.batch_size, step * loop.batch_size):
            epoch, pos = divmod(j, n)
            perm = np.random.default_rng([loop.seed, epoch]).permutation(n)
            idx.append(int(perm[pos]))
        batch = data.sft_batch([examples[i] for i in idx], pad_id, length=width)
        run.last_batch = batch
        start = time.perf_counter()
        run.state, metrics = step_fn(run.state, batch)
        metrics = jax.device_get(metrics)
        tokens = int(batch["loss_mask"].sum())
        return {**metrics, "tokens_per_s": tokens / max(time.perf_counter() - start, 1e-9)}

    return run.iterate(body)


# ---------------------------------------------------------------------------------------------
# on-policy loops: GRPO and OPD share the rollout machinery


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """The prompts an on-policy loop samples from, and how to score what comes back.

    Attributes:
      prompts: the training pool, each already tokenized (the student's view).
      reward: (index into `prompts`, completion token ids) -> float reward (GRPO).
      teacher_prompts: optional teacher view of each prompt (OPSD's privileged context).
      eos_id, pad_id: token ids of the tokenizer.
    """

    prompts: Sequence[Sequence[int]]
    reward: Callable[[int, Sequence[int]], float] | None = None
    teacher_prompts: Sequence[Sequence[int]] | None = None
    eos_id: int | None = None
    pad_id: int = 0


def _step_prompts(source: PromptSource, loop: LoopConfig, step: int) -> list[int]:
    n = len(source.prompts)
    perm = np.random.default_rng([loop.seed, 7, step]).permutation(n)
    return [int(perm[i % n]) for i in range(loop.batch_size)]


def rollout_batch(config, params, source: PromptSource, loop: LoopConfig, step: int,
                  prompt_width: int, mesh: jax.sharding.Mesh | None = None,
                  ) -> tuple[dict, list[int], sampler.Rollouts]:  # fmt: skip
    """Sample `group_size` completions of this step's prompts; arrays at a fixed run-wide width."""
    idx = _step_prompts(source, loop, step)
    rollouts = sampler.generate(
        config, params, [source.prompts[i] for i in idx], max_new_tokens=loop.max_new_tokens,
        temperature=loop.temperature, top_k=loop.top_k, top_p=loop.top_p, eos_id=source.eos_id,
        seed=(loop.seed * 1_000_003 + step) % (2**31), num_samples=loop.group_size,
        pad_id=source.pad_id, with_entropy=True, mesh=mesh,
    )  # fmt: skip
    rows = [i for i in idx for _ in range(loop.group_size)]
    prompt, prompt_mask = data.left_pad([source.prompts[i] for i in rows], prompt_width, source.pad_id)
    batch = {
        "prompt_tokens": prompt,
        "prompt_mask": prompt_mask,
        "completion": np.asarray(rollouts.tokens),
        "completion_mask": np.asarray(rollouts.mask),
    }
    if source.teacher_prompts is not None:
        width = data.round_up(max(len(p) for p in source.teacher_prompts), 16)
        t, tm = data.left_pad([source.teacher_prompts[i] for i in rows], width, source.pad_id)
        batch["teacher_prompt_tokens"], batch["teacher_prompt_mask"] = t, tm
    return batch, rows, rollouts


def _rollout_metrics(rollouts: sampler.Rollouts) -> dict:
    mask = np.asarray(rollouts.mask, bool)
    return {
        "completion_len": float(np.asarray(rollouts.lengths).mean()),
        "entropy": float(np.asarray(rollouts.entropy)[mask].mean()) if mask.any() else 0.0,
        "sampled_tokens": float(mask.sum()),
    }


def run_grpo(
    config: ModelConfig,
    params,
    source: PromptSource,
    optim: train.OptimConfig,
    loop: LoopConfig,
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
      ref_params: the frozen reference policy for the KL penalty (needed when kl_beta > 0).
      num_iterations: optimisation passes over each rollout batch (the PPO-style inner loop;
        old logprobs are the sampler's, i.e. those of the policy that generated the batch).
      reward_transform: (rewards [N], sequence logprobs [N]) -> rewards, e.g. He et al.'s
        unlikeliness reward via `losses.unlikeliness_rewards`.
      loss_kwargs: forwarded to `losses.grpo_loss` (loss_type, eps_low, eps_high, kl_beta, ...).
    """
    if source.reward is None:
        raise ValueError("run_grpo needs a PromptSource with a reward function")
    kl_beta = loss_kwargs.get("kl_beta", 0.0)
    if kl_beta > 0 and ref_params is None:
        raise ValueError("kl_beta > 0 needs ref_params (the frozen reference policy)")
    optimizer = train.make_optimizer(optim)
    objective = train.grpo_objective(config, **loss_kwargs)
    step_fn = _Compiled(train.make_step(objective, optimizer, grad_accum=optim.grad_accum),
                        config, optimizer, mesh)  # fmt: skip
    ref_logp_fn = jax.jit(lambda p, b: teacher_forced_logprobs(config, p, b))
    if ref_params is not None and mesh is not None:
        ref_params = sharding.shard_params(ref_params, sharding.param_shardings(config, mesh))
    width = data.round_up(max(len(p) for p in source.prompts), 16)
    run = _Run(loop, step_fn.place_state(train.init_state(params, optimizer, loop.seed)))

    def body(step: int) -> dict:
        start = time.perf_counter()
        batch, rows, rollouts = rollout_batch(config, run.state.params, source, loop, step, width,
                                              mesh)  # fmt: skip
        completions = [
            np.asarray(rollouts.tokens[r, : int(rollouts.lengths[r])]).tolist()
            for r in range(len(rows))
        ]
        rewards = np.asarray([source.reward(i, c) for i, c in zip(rows, completions)], np.float32)
        if not np.all(np.isfinite(rewards)):
            raise ValueError(f"non-finite reward at step {step}: {rewards[~np.isfinite(rewards)]}")
        correct = rewards.copy()
        old_logp = np.asarray(rollouts.logprobs)
        if reward_transform is not None:
            rewards = np.asarray(reward_transform(rewards, (old_logp * batch["completion_mask"]).sum(1)))
        adv, _ = losses.group_advantages(
            jnp.asarray(rewards), loop.group_size, scale=advantage_scale
        )
        batch.update(old_logp=old_logp, advantages=np.asarray(adv))
        run.last_batch = batch
        if kl_beta > 0:
            batch = {**batch, "ref_logp": np.asarray(
                ref_logp_fn(ref_params, jax.tree.map(jnp.asarray, batch)))}  # fmt: skip
        for _ in range(num_iterations):
            run.state, metrics = step_fn(run.state, batch)
        metrics = jax.device_get(metrics)
        elapsed = time.perf_counter() - start
        roll = _rollout_metrics(rollouts)
        return {
            **metrics, "reward": float(rewards.mean()), "pass_rate": float((correct > 0).mean()),
            **roll, "tokens_per_s": roll["sampled_tokens"] / max(elapsed, 1e-9),
        }  # fmt: skip

    return run.iterate(body)


def run_opd(
    config: ModelConfig,
    params,
    teacher_config: ModelConfig,
    teacher_params,
    source: PromptSource,
    loss_fn,
    optim: train.OptimConfig,
    loop: LoopConfig,
    *,
    mesh: jax.sharding.Mesh | None = None,
) -> RunResult:
    """On-policy distillation: the student samples, the teacher scores every token of it.

    `loss_fn` is `losses.opd_kl(alpha, ...)` or a variant. With `source.teacher_prompts` set this
    is OPSD: the teacher (typically the frozen initial student) sees a privileged prompt.
    """
    optimizer = train.make_optimizer(optim)
    objective = train.opd_objective(config, teacher_config, loss_fn)
    step_fn = _Compiled(train.make_step(objective, optimizer, grad_accum=optim.grad_accum),
                        config, optimizer, mesh)  # fmt: skip
    teacher_params = step_fn.place_frozen(teacher_config, teacher_params)
    width = data.round_up(max(len(p) for p in source.prompts), 16)
    run = _Run(loop, step_fn.place_state(train.init_state(params, optimizer, loop.seed)))

    def body(step: int) -> dict:
        start = time.perf_counter()
        batch, rows, rollouts = rollout_batch(config, run.state.params, source, loop, step, width,
                                              mesh)  # fmt: skip
        run.last_batch = batch
        run.state, metrics = step_fn(run.state, batch, teacher_params)
        metrics = jax.device_get(metrics)
        roll = _rollout_metrics(rollouts)
        extra = {}
        if source.reward is not None:
            rewards = [
                source.reward(i, np.asarray(rollouts.tokens[r, : int(rollouts.lengths[r])]).tolist())
                for r, i in enumerate(rows)
            ]
            extra["pass_rate"] = float(np.mean(np.asarray(rewards) > 0))
        elapsed = time.perf_counter() - start
        return {**metrics, **roll, **extra,
                "tokens_per_s": roll["sampled_tokens"] / max(elapsed, 1e-9)}  # fmt: skip

    return run.iterate(body)


def teacher_forced_logprobs(config: ModelConfig, params, batch) -> jax.Array:
    """Per-token log π(completion) [N, M] under a model, for reference/KL bookkeeping."""
    logits = train.completion_logits(
        config, params, batch["prompt_tokens"], batch["prompt_mask"], batch["completion"],
        batch["completion_mask"],
    )  # fmt: skip
    return losses.token_logprobs(logits, batch["completion"])


__all__ = [
    "LoopConfig",
    "PromptSource",
    "RunResult",
    "rollout_batch",
    "run_grpo",
    "run_opd",
    "run_sft",
    "teacher_forced_logprobs",
]
