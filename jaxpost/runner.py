"""What every training loop runs inside: the one jitted step and the step loop around it.

`StepFunction` is a loop's only `jax.jit`: explicit in/out shardings on a mesh, the state donated,
the batch assembled from this process's rows. `Runner.iterate(body)` runs `body(step)` for the
remaining steps and owns everything around it: restoring the latest checkpoint, reading step t's
metrics only after step t+1 is dispatched (`metrics_log.DeferredMetrics`), logging them from
process 0, saving checkpoints, turning SIGTERM into a clean save-and-stop (every process agrees,
`preemption.sync_should_stop`), and the progress bar.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxpost import distributed, sharding, train
from jaxpost.checkpoint import Checkpointer, abstract_like
from jaxpost.errors import Diverged
from jaxpost.metrics_log import DeferredMetrics, MetricsWriter
from jaxpost.models import ModelConfig
from jaxpost.preemption import PreemptionGuard, sync_should_stop


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
      desc: label of the progress bar and of the run's messages.
      max_skipped_streak: stop as diverged (`errors.Diverged`) after this many consecutive steps
        skipped for a non-finite loss or gradient (0: never).
      max_skipped_share: ... or when more than this share of the last `skip_window` steps were
        skipped (checked once that many steps ran; 1.0: never).
      skip_window: the window of `max_skipped_share`.
      loss_explode: ... or when a finite loss exceeds this many times max(1, |first loss|)
        (0: never).
      max_param_growth: ... or when the parameters' norm has grown more than this many times
        its value at the start (floored at 1), checked before every checkpoint and at the end
        (0: never).
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
    max_skipped_streak: int = 10
    max_skipped_share: float = 0.5
    skip_window: int = 100
    loss_explode: float = 1e4
    max_param_growth: float = 100.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "skip_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if self.max_skipped_streak < 0 or not 0 < self.max_skipped_share <= 1:
            raise ValueError("max_skipped_streak must be >= 0 and max_skipped_share in (0, 1]")
        if self.loss_explode < 0 or self.max_param_growth < 0:
            raise ValueError("loss_explode and max_param_growth must be >= 0 (0: off)")


class DivergenceWatch:
    """Decides, from each step's logged metrics, whether a run has diverged.

    A train step whose loss or gradient is not finite is skipped (`train.make_step`: nothing
    reaches the parameters) and counted in the `skipped` metric. One skipped step is noise; a run
    whose steps keep being skipped, whose loss grows by orders of magnitude, or whose parameters
    blew up (`params`: a learning rate far too large moves them by orders of magnitude at its
    first step, before any loss has seen it) is not training any more, and reporting it as a
    success would hand on a broken model. `observe` returns the
    reason the run diverged, or None; `finish` says whether a run too short for the streak
    ended skipping (its last steps, at least half of the steps it ran, all skipped).
    """

    def __init__(self, loop: LoopConfig):
        self.loop = loop
        self.streak = 0  # consecutive loop steps with a skipped update
        self.recent: list[bool] = []  # the last skip_window steps: skipped?
        self.reference: float | None = None  # |first finite loss|, floored at 1
        self.seen = 0
        self._skipped = None

    def observe(self, step: int, metrics: dict) -> str | None:
        loop = self.loop
        self.seen += 1
        count = metrics.get("skipped")
        if count is not None:
            previous = self._skipped if self._skipped is not None else count - (
                1 - metrics.get("finite", 1))  # fmt: skip
            skipped, self._skipped = count > previous, count
            self.streak = self.streak + 1 if skipped else 0
            self.recent = (self.recent + [skipped])[-loop.skip_window:]
            if loop.max_skipped_streak and self.streak >= loop.max_skipped_streak:
                return (f"{self.streak} consecutive steps were skipped for a non-finite loss or "
                        f"gradient")  # fmt: skip
            share = sum(self.recent) / len(self.recent)
            if len(self.recent) == loop.skip_window and share > loop.max_skipped_share:
                return (f"{sum(self.recent)} of the last {loop.skip_window} steps were skipped "
                        f"for a non-finite loss or gradient")  # fmt: skip
        loss = metrics.get("loss")
        if loss is None or not math.isfinite(loss):
            return None
        if self.reference is None:
            self.reference = max(1.0, abs(loss))
        elif loop.loss_explode and abs(loss) > loop.loss_explode * self.reference:
            return (f"the loss exploded to {loss:.3g} (more than {loop.loss_explode:g} x "
                    f"{self.reference:.3g}, the first step's)")  # fmt: skip
        return None

    def params(self, norm: float, start: float) -> str | None:
        """`norm`: the parameters' global norm now; `start`: at the start of the run."""
        limit = self.loop.max_param_growth
        if limit and not norm <= limit * max(start, 1.0):  # (NaN fails the comparison)
            return (f"the parameters' norm grew to {norm:.3g} from {start:.3g} (more than "
                    f"{limit:g} x)")  # fmt: skip
        return None

    def finish(self) -> str | None:
        limit = min(self.loop.max_skipped_streak, (self.seen + 1) // 2)
        if self.loop.max_skipped_streak and self.streak and self.streak >= limit:
            return (f"its last {self.streak} of {self.seen} steps were skipped for a non-finite "
                    f"loss or gradient")  # fmt: skip
        return None


@dataclasses.dataclass
class RunResult:
    """What a loop returns: the final state and every logged row of metrics; `params` the
    model's parameters (the state's, or under LoRA the base merged with the trained adapters)."""

    state: train.TrainState
    history: list[dict]
    preempted: bool = False
    last_batch: Any = None  # this process's rows of the final step's batch (state locality)
    params: Any = None
    guide: Any = None  # a decoding-time guide the policy samples with (`sampler.Guide`, Q♯)


class StepFunction:
    """A loop's one jitted step, on one device or sharded over a mesh.

    `jax.jit` with explicit in/out shardings and a donated state, compiled at the first batch
    (when the batch's fields are known). On a mesh the state is placed by
    `train.state_shardings`, frozen models (teacher, reference) by their parameter shardings,
    and each batch is assembled from this process's rows over the data axes.
    """

    def __init__(self, step: Callable, config: ModelConfig, optimizer, mesh=None,
                 replicate_state: bool = False):  # fmt: skip
        self.step, self.config, self.optimizer, self.mesh = step, config, optimizer, mesh
        self.replicate_state = replicate_state  # a small trained tree (LoRA adapters)
        self._fn = None
        self._frozen_sh: tuple = ()

    def init_state(self, params, seed: int) -> train.TrainState:
        state = train.init_state(params, self.optimizer, seed)
        if self.mesh is None:
            return state
        if self.replicate_state:
            return jax.device_put(state, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
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
    """Checkpoint resume, deferred metric logging, divergence, preemption and the progress bar
    around a step loop (`iterate`)."""

    def __init__(self, loop: LoopConfig, state: train.TrainState):
        self.loop = loop
        self.history: list[dict] = []
        self.ckpt = None
        self.state = state
        if loop.workdir:
            self.ckpt = Checkpointer(os.path.join(loop.workdir, "checkpoints"),
                                     max_to_keep=loop.keep_checkpoints)  # fmt: skip
        self.start = 0  # loop steps done (an on-policy step may make several updates)
        if self.ckpt is not None and self.ckpt.latest_step() is not None:
            self.state, self.start = self.ckpt.restore_newest_intact(abstract_like(state), _say)
            _say(f"{loop.desc}: resuming from step {self.start} ({self.ckpt.directory})")
        writer = loop.workdir and distributed.is_writer()
        # a resumed run's metrics file keeps the rows up to the restored step, so replayed steps
        # are written once
        self.writer = MetricsWriter(loop.workdir, resume_step=self.start) if writer else None
        self.last_batch = None
        self.watch = DivergenceWatch(loop)
        self.start_norm = _param_norm(self.state) if loop.max_param_growth else 0.0

    def _check_params(self, step: int) -> None:
        """Before a checkpoint or the end of the run: refuse parameters that blew up."""
        if self.loop.max_param_growth:
            reason = self.watch.params(_param_norm(self.state), self.start_norm)
            if reason is not None:
                raise self._diverged(step, reason)

    def _log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        if self.writer is not None and (step % self.loop.log_every == 0 or step == self.loop.steps):
            self.writer.write(step, metrics)

    def _save_due(self, step: int) -> bool:
        every = self.loop.checkpoint_every
        periodic = bool(every) and step % every == 0 and self.watch.streak == 0
        return self.ckpt is not None and (step == self.loop.steps or periodic)

    def _diverged(self, step: int, reason: str) -> Diverged:
        where = "no checkpoint was saved"
        if self.ckpt is not None:
            self.ckpt.wait()
            good = self.ckpt.latest_step()
            if good is not None:
                where = f"the last good checkpoint is step {good} in {self.ckpt.directory}"
        return Diverged(f"{self.loop.desc} diverged at step {step}: {reason}; {where}, and no "
                        f"model was saved; lower the learning rate or raise the warmup")  # fmt: skip

    def iterate(self, body: Callable[[int], tuple[dict, dict]]) -> RunResult:
        """Run `body(step) -> (device metrics, host metrics)` for the remaining steps (1-based).

        Step t's device metrics are fetched once step t+1 has been dispatched, then logged with
        its host metrics and the wall time per step, and checked for divergence
        (`DivergenceWatch`: raises `errors.Diverged` without saving). A checkpoint whose
        background write failed stops the run at the next step boundary (`CheckpointWriteError`).
        A periodic checkpoint is not taken while steps are being skipped.
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
            reason = self.watch.observe(step, metrics)
            if reason is not None:
                raise self._diverged(step, reason)

        with PreemptionGuard() as guard:
            try:
                last = time.perf_counter()
                for step in range(self.start + 1, loop.steps + 1):
                    device_metrics, extra = body(step)
                    now = time.perf_counter()
                    host[step] = (extra, now - last)
                    last = now
                    emit(deferred.push(step, device_metrics))
                    if self.ckpt is not None:
                        self.ckpt.check()  # a failed background write surfaces here
                    preempted = sync_should_stop(guard.should_stop)
                    save = self.ckpt is not None and (preempted or self._save_due(step))
                    if save or step == loop.steps:  # checked before anything is saved
                        emit(deferred.flush())  # a checkpoint syncs with the device anyway
                        if step == loop.steps and (reason := self.watch.finish()) is not None:
                            raise self._diverged(step, reason)
                        self._check_params(step)
                    if save:
                        self.ckpt.save(step, self.state, force=True)
                    if preempted:
                        break
                emit(deferred.flush())
            finally:
                bar.close()
                if self.writer is not None:
                    self.writer.close()
                if self.ckpt is not None:
                    self.ckpt.close()  # waits for the last save; a failed write raises here
        return RunResult(state=self.state, history=self.history, preempted=preempted,
                         last_batch=self.last_batch, params=self.state.params)  # fmt: skip


@jax.jit
def _global_norm(params) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params)))


def _param_norm(state) -> float:
    return float(_global_norm(state.params))


def _say(message: str) -> None:
    if distributed.is_writer():
        print(message, flush=True)
