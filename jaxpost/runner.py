"""What every training loop runs inside: the one jitted step and the step loop around it.

`StepFunction` is a loop's only `jax.jit`: explicit in/out shardings on a mesh, the state donated,
the batch assembled from this process's rows. `Runner.iterate(body)` runs `body(step)` for the
remaining steps and owns everything around it: restoring the latest checkpoint, reading step t's
metrics only after step t+1 is dispatched (`metrics_log.DeferredMetrics`), logging them from
process 0, saving checkpoints, turning SIGTERM into a clean save-and-stop (every process agrees,
`checkpoint.sync_should_stop`), and the progress bar.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxpost import distributed, sharding, train
from jaxpost.checkpoint import Checkpointer, PreemptionGuard, sync_should_stop
from jaxpost.metrics_log import DeferredMetrics, MetricsWriter
from jaxpost.models import ModelConfig


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


class Runner:
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
        self.start = 0  # loop steps done (an on-policy step may make several updates)
        if self.ckpt is not None and self.ckpt.latest_step() is not None:
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
            )
            self.state, _ = self.ckpt.restore(abstract)
            self.start = self.ckpt.latest_step()
        self.last_batch = None

    def _log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        if self.writer is not None and (step % self.loop.log_every == 0 or step == self.loop.steps):
            self.writer.write(step, metrics)

    def _save_due(self, step: int) -> bool:
        every = self.loop.checkpoint_every
        periodic = bool(every) and step % every == 0
        return self.ckpt is not None and (step == self.loop.steps or periodic)

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
                    preempted = sync_should_stop(guard.should_stop)
                    if self.ckpt is not None and (preempted or self._save_due(step)):
                        emit(deferred.flush())  # a checkpoint syncs with the device anyway
                        self.ckpt.save(step, self.state, force=True)
                    if preempted:
                        break
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
