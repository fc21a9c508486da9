"""The train step a plan describes, built as `jaxpost.loops` builds it, compiled from abstract
inputs: XLA's memory analysis of it is what `jaxpost.plan` is checked against.

    memory = plan_program.compiled_memory(config, mesh, objective="grpo", rows=16,
                                          prompt_len=64, completion_len=256)

The step is `train.jit_step(train.make_step(objective, optimizer), state_sharding=...,
batch_sharding=..., frozen_sharding=...)` lowered under `jax.set_mesh(mesh)` (with `mesh=None`:
plain `train.jit_step(step)`, one device, as a loop without a mesh runs it), on
`jax.ShapeDtypeStruct`s: nothing is allocated, so a 0.5B model's step compiles on a laptop. The
batch has the fields the loops fill: SFT a `data.SequenceBatch` [rows, seq_len]; GRPO and OPD a
`data.CompletionBatch` as `rollouts.sample_step` returns it (prompt [rows, P], completion
[rows, M], old and sampling logprobs; GRPO's advantages [rows]; an OPSD teacher prompt
[rows, Pt] when `teacher_prompt_len` is given). Frozen inputs: the GRPO reference (the
student's config) or the OPD teacher, sharded by their parameter rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost import data, losses, models, sharding, train
from jaxpost.models import ModelConfig


def step_program(config: ModelConfig, *, objective: str, loss_impl: str = "materialized",
                 rows: int, seq_len: int | None = None, prompt_len: int | None = None,
                 completion_len: int | None = None, teacher_config: ModelConfig | None = None,
                 teacher_prompt_len: int | None = None, with_reference: bool = False,
                 distill_loss=None, optimizer=None):  # fmt: skip
    """(step function, abstract state, abstract batch, frozen (config, abstract params) pairs)
    for one objective; `optimizer` defaults to the trainer's AdamW, `distill_loss` (OPD) to
    `losses.opd_kl(1.0)` (reverse KL, the mains' default)."""
    optimizer = optimizer or train.make_optimizer(train.OptimConfig())
    s = jax.ShapeDtypeStruct
    ints = lambda w: s((rows, w), jnp.int32)  # noqa: E731
    frozen = ()
    if objective == "sft":
        fn = train.sft_objective(config, loss_impl)
        batch = data.SequenceBatch(ints(seq_len), ints(seq_len), ints(seq_len))
    else:
        M = completion_len
        batch = data.CompletionBatch(
            prompt_tokens=ints(prompt_len), prompt_mask=ints(prompt_len), completion=ints(M),
            completion_mask=ints(M), old_logp=s((rows, M), jnp.float32),
            sampling_logp=s((rows, M), jnp.float32),
        )  # fmt: skip
        if objective == "grpo":
            batch = batch.replace(advantages=s((rows,), jnp.float32))
            kw = dict(with_reference=True, kl_beta=0.04) if with_reference else {}
            fn = train.grpo_objective(config, loss_impl=loss_impl, **kw)
            frozen = ((config, models.abstract_params(config)),) if with_reference else ()
        elif objective == "opd":
            teacher_config = teacher_config or config
            if teacher_prompt_len is not None:
                batch = batch.replace(teacher_prompt_tokens=ints(teacher_prompt_len),
                                      teacher_prompt_mask=ints(teacher_prompt_len))  # fmt: skip
            loss = losses.opd_kl(1.0) if distill_loss is None else distill_loss
            fn = train.opd_objective(config, teacher_config, loss, loss_impl)
            frozen = ((teacher_config, models.abstract_params(teacher_config)),)
        else:
            raise ValueError(f"unknown objective {objective!r}")
    step = train.make_step(fn, optimizer)
    state = jax.eval_shape(lambda p: train.init_state(p, optimizer), models.abstract_params(config))
    return step, state, batch, frozen, optimizer


def compiled_memory(config: ModelConfig, mesh=None, **program):
    """XLA's `memory_analysis()` of the compiled step (per device); `program`: `step_program`'s
    keyword arguments. `mesh`: a `jax.sharding.Mesh` (real devices: it compiles) or None."""
    step, state, batch, frozen, optimizer = step_program(config, **program)
    frozen_params = tuple(p for _, p in frozen)
    if mesh is None:
        jitted = train.jit_step(step)
        return jitted.lower(state, batch, *frozen_params).compile().memory_analysis()
    batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)
    jitted = train.jit_step(
        step, state_sharding=train.state_shardings(config, mesh, optimizer),
        batch_sharding=batch_sh,
        frozen_sharding=tuple(sharding.param_shardings(c, mesh) for c, _ in frozen),
    )  # fmt: skip
    with jax.set_mesh(mesh):
        return jitted.lower(state, batch, *frozen_params).compile().memory_analysis()
