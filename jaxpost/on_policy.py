"""The on-policy loop every RL and distillation loop shares, and the LoRA-or-full choice of what
a loop trains (`jaxpost.loops` builds on them).

`run_on_policy`: sample the step's prompts with the current policy (or a `collect` hook's
rounds), score them on the host, take optimizer steps; `adapted`: the step function, the trained
tree and the frozen inputs of a loop, with low-rank adapters (`jaxpost.lora`) or without;
`frozen_from_state` lets a frozen input follow the trained state (an EMA self-teacher).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jaxpost import data, rollouts, runner, sharding, train
from jaxpost import lora as lora_lib
from jaxpost.lora import LoraConfig
from jaxpost.models import ModelConfig
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig, RunResult, StepFunction


def mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def adapted(config, params, objective, optimizer, grad_accum, mesh, lora, seed, frozen=()):
    """(step function, trained tree, placed frozen params, trained -> model params): the plain
    step on the model's parameters, or under `lora` (`jaxpost.lora`) a step that trains the
    adapters with the base as the first frozen input."""
    if lora is not None:
        objective = lora_lib.wrap_objective(objective, lora)
        frozen = [(config, params), *frozen]
    step_fn = StepFunction(train.make_step(objective, optimizer, grad_accum=grad_accum), config,
                           optimizer, mesh, replicate_state=lora is not None)  # fmt: skip
    placed = tuple(step_fn.place_frozen(c, p) for c, p in frozen)
    if lora is None:
        return step_fn, params, placed, lambda trained: trained
    merge = jax.jit(functools.partial(lora_lib.merge, config=lora))
    return step_fn, lora_lib.init(params, lora, seed), placed, lambda a: merge(placed[0], a)


def finish(result: RunResult, model_params) -> RunResult:
    return dataclasses.replace(result, params=model_params(result.state.params))


# ---------------------------------------------------------------------------------------------
# the on-policy loop


Score = Callable[[rollouts.StepRollouts], tuple[data.CompletionBatch, dict]]
Collect = Callable[[Any, int], tuple[rollouts.StepRollouts, dict]]


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
    collect: Collect | None = None,
    lora: LoraConfig | None = None,
    extra_transform: optax.GradientTransformation | None = None,
    frozen_from_state: Callable[[train.TrainState], tuple] | None = None,
    companions: dict | None = None,
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
      collect: (params, step) -> (this process's rollouts, metrics), e.g. `shaping.collect`'s
        dynamic sampling; default one `rollouts.sample_step`.
      lora: train low-rank adapters on a frozen `params` (`jaxpost.lora`); the sampler uses the
        merged model, the result's `params` are the merged model.
      extra_transform: chained after the optimizer (its state is checkpointed with it), e.g.
        `teachers.ema_tracker`.
      frozen_from_state: (train state) -> the frozen inputs of the next update, instead of
        `frozen`'s fixed ones (e.g. the EMA the optimizer state holds).
      companions: models trained in the same step as the policy (name -> parameters, e.g.
        GAD's discriminator): the trained tree is then {"policy": params, **companions}, the
        objective takes that tree, the sampler and the result's `params` see "policy", and the
        state (checkpoints included) holds them all. One device, no LoRA.
    """
    rows = loop.batch_size * sampling.group_size
    if mesh is not None and rows % sharding.data_parallel_size(mesh):
        raise ValueError(f"{loop.batch_size} prompts x {sampling.group_size} samples = {rows} rows "
                         f"do not split over the mesh's data-parallel size "
                         f"{sharding.data_parallel_size(mesh)}")  # fmt: skip
    optimizer = train.make_optimizer(optim)
    if extra_transform is not None:
        optimizer = optax.chain(optimizer, extra_transform)
    if companions:
        if mesh is not None or lora is not None or "policy" in companions:
            raise ValueError("models trained beside the policy (companions) run on one device "
                             "without LoRA, and none is named 'policy'")  # fmt: skip
        params = {"policy": params, **companions}
    step_fn, trained, frozen_params, model_params = adapted(
        config, params, objective, optimizer, optim.grad_accum, mesh, lora, loop.seed, frozen)
    if companions:
        model_params = lambda trained: trained["policy"]  # noqa: E731
    run = runner.Runner(loop, step_fn.init_state(trained, loop.seed))
    if collect is None:
        def collect(params, step):
            return rollouts.sample_step(config, params, source, sampling, batch_size=loop.batch_size,
                                        seed=loop.seed, step=step, mesh=mesh), {}  # fmt: skip

    def body(step: int) -> tuple[dict, dict]:
        start = time.perf_counter()
        r, collected = collect(model_params(run.state.params), step)
        batch, extra = score(r)
        run.last_batch = batch
        for _ in range(updates_per_batch):
            frozen_now = frozen_params if frozen_from_state is None else frozen_from_state(run.state)
            run.state, metrics = step_fn(run.state, batch, *frozen_now)
        roll = rollouts.rollout_metrics(r)
        roll["sampled_tokens_per_s"] = roll["sampled_tokens"] / max(time.perf_counter() - start,
                                                                    1e-9)  # fmt: skip
        return metrics, {**collected, **extra, **roll}

    with mesh_context(mesh):
        return finish(run.iterate(body), model_params)


__all__ = ["Collect", "Score", "adapted", "finish", "mesh_context", "run_on_policy"]
