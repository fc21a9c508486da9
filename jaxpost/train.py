"""Train state, optimizer and the one pure step per paradigm.

A step is a pure function `(state, batch, *frozen) -> (state, metrics)`: `frozen` holds the
teacher's or reference model's parameters, which are inputs and never part of the state (so they
are never checkpointed with the student). `jit_step` compiles it once with explicit shardings and
a donated state.

A step whose loss or gradient is not finite is *skipped*: parameters and optimizer state are
kept as they were and `state.skipped` is incremented, so a NaN can never reach the parameters.

The objectives, and the choice of loss path they share (`loss_impl`: materialized logits or
fused-linear from hidden states), live in `jaxpost.objectives` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxpost import models
from jaxpost.models import ModelConfig
from jaxpost.objectives import (  # noqa: F401  (re-exported: train.sft_objective, ...)
    FUSED_MIN_VOCAB,
    KERNEL_IMPLS,
    LOSS_IMPLS,
    Objective,
    completion_hidden,
    completion_logits,
    completion_logprobs,
    grpo_objective,
    head_logprobs,
    head_operand,
    jitted_completion_logprobs,
    opd_objective,
    resolve_loss_impl,
    sampled_opd_objective,
    sft_objective,
)


@struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-for-bit: the student, its optimizer, counters.

    `rng` is raw key data (uint32), so the state is a plain array pytree that orbax can save.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping, gradient accumulation.

    Attributes:
      learning_rate: peak learning rate, reached after `warmup_steps`.
      warmup_steps: linear warmup from 0.
      total_steps: length of the schedule; the cosine ends at `end_lr_ratio · learning_rate`.
      end_lr_ratio: final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay (AdamW).
      b1, b2, eps: Adam moments.
      clip_norm: global gradient-norm clip (None: off).
      grad_accum: micro-batches per update; the batch's leading dimension is split this many ways.
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 10
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum: int = 1

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and total_steps >= 1")
        if not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"end_lr_ratio must lie in [0, 1], got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"Adam betas must lie in [0, 1), got b1={self.b1}, b2={self.b2}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.learning_rate,
            warmup_steps=self.warmup_steps,
            decay_steps=max(self.total_steps, self.warmup_steps + 1),
            end_value=self.learning_rate * self.end_lr_ratio,
        )


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm is not None else []
    parts.append(
        optax.adamw(
            cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    )
    return optax.chain(*parts)


def init_state(params, optimizer: optax.GradientTransformation, seed: int = 0) -> TrainState:
    """A fresh state that owns copies of `params`.

    Steps donate the state, so its buffers are consumed by the next update; copying here keeps
    the caller's `params` (a base model reused by several runs, say) alive and unchanged.
    """
    params = jax.tree.map(jnp.copy, params)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------------------------------------
# the step


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_step(objective: Objective, optimizer: optax.GradientTransformation, *,
              grad_accum: int = 1) -> Callable:  # fmt: skip
    """The update `(state, batch, *frozen) -> (state, metrics)` for an objective.

    With `grad_accum` = k the batch's leading dimension is split into k micro-batches that are
    scanned in sequence; the update uses the mean of their gradients (and the loss reported is
    the mean of their losses), so peak activation memory is that of one micro-batch.
    """
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step(state: TrainState, batch, *frozen):
        if grad_accum == 1:
            (loss, aux), grads = grad_fn(state.params, batch, *frozen)
        else:

            def split(x):
                if x.shape[0] % grad_accum:
                    raise ValueError(
                        f"batch size {x.shape[0]} is not divisible by grad_accum={grad_accum}"
                    )
                return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

            def micro(carry, mb):
                (l, a), g = grad_fn(state.params, mb, *frozen)
                return jax.tree.map(jnp.add, carry, g), (l, a)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, (ls, auxs) = jax.lax.scan(micro, zeros, jax.tree.map(split, batch))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            loss, aux = jnp.mean(ls), jax.tree.map(lambda a: jnp.mean(a, axis=0), auxs)

        finite = jnp.isfinite(loss) & _all_finite(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            step=state.step + 1,
            rng=state.rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "skipped": new_state.skipped,
            "finite": finite.astype(jnp.int32),
            **{k: v for k, v in aux.items() if jnp.ndim(v) == 0},
        }
        return new_state, metrics

    return step


def jit_step(step: Callable, *, state_sharding=None, batch_sharding=None, frozen_sharding=None):
    """`jax.jit(step)` with the state donated and, when given, explicit in/out shardings.

    With shardings, call (and lower) it under `jax.set_mesh(mesh)`: the model pins its
    activations by logical axes only when it is traced under the mesh (`jaxpost.sharding`).
    `frozen_sharding` is one sharding tree per frozen argument (teacher, reference), a tuple.
    """
    if state_sharding is None:
        return jax.jit(step, donate_argnums=0)
    in_sh = (state_sharding, batch_sharding, *(frozen_sharding or ()))
    return jax.jit(step, in_shardings=in_sh, out_shardings=(state_sharding, None),
                   donate_argnums=0)  # fmt: skip


def state_shardings(config: ModelConfig, mesh, optimizer: optax.GradientTransformation):
    """A TrainState of NamedShardings: parameters and their optimizer moments by the logical
    rules of `jaxpost.sharding`, counters and the rng replicated."""
    from jaxpost import sharding

    param_sh = sharding.param_shardings(config, mesh)
    opt_shapes = jax.eval_shape(optimizer.init, models.abstract_params(config))
    rep = sharding.replicated(mesh)
    return TrainState(
        params=param_sh,
        opt_state=sharding.opt_state_shardings(optimizer, opt_shapes, param_sh),
        step=rep,
        rng=rep,
        skipped=rep,
    )
