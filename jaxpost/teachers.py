"""Teachers that fit: a top-k teacher scored outside the student's step.

A full-vocabulary teacher gives every completion token a distribution over V entries: inside the
student's step that is a second model's forward and its [N, M, V] scores; cached or sent from
other devices it is N·M·V numbers. A top-k teacher (`kernels.fused_linear_topk`) keeps the k most
likely ids per token, their log-probabilities and the log of the remaining mass: k + 1 numbers a
token. `topk_teacher` is the teacher's own program (run it once per batch, on its own devices, or
keep its output for reuse); `topk_opd_objective` is the student's step, which takes the scores
as part of the batch (`data.CompletionBatch.teacher_topk`) and holds no teacher parameters.
`loops.run_opd(..., teacher_topk=k)` wires the two; `jaxpost.teacher_service.TopkTeachers` adds
several teachers, their own devices, a score cache and a different tokenizer.

Self-teachers (OPSD's teacher is the student itself, seeing privileged context): besides the
frozen starting policy, the live policy (`SELF_TEACHERS` "live": the current parameters under
stop_gradient, the teacher moves with every update) or an exponential moving average of it
("ema": `ema_tracker` keeps EMA_t = d·EMA_{t−1} + (1 − d)·θ_t in the optimizer state, so it is
checkpointed and resumes exactly; the next update's teacher is `ema_of(state)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import kernels
from jaxpost import data, objectives
from jaxpost.models import ModelConfig


def topk_teacher(teacher_config: ModelConfig, k: int, *, loss_impl: str = "materialized",
                 temperature: float = 1.0) -> Callable:
    """The teacher's scoring program `(teacher_params, batch) -> kernels.TopK` of a top-k
    teacher: for every completion token, the ids of its k most likely next tokens [N, M, k],
    their log-probabilities and the log of the remaining mass [N, M], in the teacher's view of
    the prompt. k + 1 numbers a token instead of V: what a cache or another device holds
    (`kernels.fused_linear_topk`; "fused_linear" never forms [N, M, V] logits)."""
    impl = objectives.plain_impl(loss_impl, teacher_config)

    def score(teacher_params, batch: data.CompletionBatch):
        prompt, prompt_mask = batch.teacher_prompt()
        hidden = objectives.completion_hidden(teacher_config, teacher_params, prompt, prompt_mask,
                                   batch.completion, batch.completion_mask)  # fmt: skip
        if impl != "fused_linear":
            logits = objectives.head_logits(teacher_config, teacher_params, hidden)
            return kernels.topk_from_logits(logits, k, temperature=temperature)
        n, m, d = hidden.shape
        head, layout = objectives.head_operand(teacher_config, teacher_params)
        top = kernels.fused_linear_topk(hidden.reshape(n * m, d), head, k,
                                        temperature=temperature,
                                        mask=batch.completion_mask.reshape(n * m),
                                        head_layout=layout,
                                        compute_dtype=teacher_config.compute_dtype)  # fmt: skip
        return jax.tree.map(lambda x: x.reshape(n, m, *x.shape[1:]), top)

    return score


def topk_opd_objective(config: ModelConfig, *, alpha: float = 1.0, temperature: float = 1.0,
                       loss_impl: str = "materialized") -> objectives.Objective:  # fmt: skip
    """On-policy distillation from a top-k teacher: the batch's `teacher_topk` (`topk_teacher`)
    against the student's probabilities at the same k ids plus its own tail bucket, D_α of
    `kernels.bucket_divergence` (α 0 forward KL, 1 reverse KL) per token, the mean over the
    trained tokens. No teacher parameters in the step. aux: `num_tokens`, `divergence_max`,
    `teacher_tail_mass` (the mean mass the teacher left outside its top k)."""
    impl = objectives.plain_impl(loss_impl, config)

    def objective(params, batch: data.CompletionBatch):
        top = batch.teacher_topk
        if top is None:
            raise ValueError("the batch has no teacher_topk (score it with topk_teacher)")
        hidden = objectives.completion_hidden(config, params, batch.prompt_tokens, batch.prompt_mask,
                                   batch.completion, batch.completion_mask)  # fmt: skip
        n, m, d = hidden.shape
        k = top.idx.shape[-1]
        if impl == "fused_linear":
            head, layout = objectives.head_operand(config, params)
            student = kernels.fused_linear_bucket_logprobs(
                hidden.reshape(n * m, d), head, top.idx.reshape(n * m, k),
                temperature=temperature, mask=batch.completion_mask.reshape(n * m),
                head_layout=layout, compute_dtype=config.compute_dtype)  # fmt: skip
        else:
            logits = objectives.head_logits(config, params, hidden)
            student = kernels.bucket_logprobs_from_logits(logits, top.idx, temperature=temperature)
        teacher = jax.lax.stop_gradient(top.buckets()).reshape(n * m, k + 1)
        div = kernels.bucket_divergence(_fold_dead(student.reshape(n * m, k + 1), teacher),
                                        teacher, alpha)  # fmt: skip
        valid = batch.trained_mask().astype(bool)
        div = jnp.where(valid, div.reshape(n, m), 0.0)
        count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
        tail = jnp.where(valid, jnp.exp(top.log_tail), 0.0).sum() / count
        return div.sum() / count, {"num_tokens": valid.sum().astype(jnp.float32),
                                   "divergence_max": jnp.max(div, initial=0.0),
                                   "teacher_tail_mass": jax.lax.stop_gradient(tail)}  # fmt: skip

    return objective


def _fold_dead(student_NxB, teacher_NxB) -> jax.Array:
    """The student's buckets with the ids the teacher marks dead (log-probability −inf: slots a
    projection into another vocabulary left empty, `jaxpost.cross_tokenizer`) folded into its
    tail bucket, so both sides compare the same events; unchanged when none is dead."""
    dead = jnp.isneginf(teacher_NxB[:, :-1])
    any_dead = dead.any(-1)
    slots = jnp.where(dead, -jnp.inf, student_NxB[:, :-1])
    # rows without a dead slot take a finite dummy, so no gradient passes through a logsumexp of
    # nothing but −inf (its softmax is NaN, and a where does not stop a NaN cotangent)
    moved = jax.nn.logsumexp(jnp.where(any_dead[:, None], jnp.where(dead, student_NxB[:, :-1],
                                                                    -jnp.inf), 0.0), axis=-1)  # fmt: skip
    tail = jnp.where(any_dead, jnp.logaddexp(student_NxB[:, -1], moved), student_NxB[:, -1])
    return jnp.concatenate([slots, tail[:, None]], axis=-1)


SELF_TEACHERS = ("frozen", "live", "ema")


class EmaState(NamedTuple):
    """`ema_tracker`'s state: the moving average of the parameters (their tree and dtypes)."""

    ema: Any


def ema_tracker(decay: float) -> optax.GradientTransformation:
    """An optax transformation (chain it after the optimizer) that leaves the updates as they are
    and tracks EMA ← d·EMA + (1 − d)·(θ + u), the parameters after the update, starting at θ_0."""
    if not 0 <= decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {decay}")

    def init(params):
        return EmaState(jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("ema_tracker needs the parameters (optax's update(..., params))")
        ema = jax.tree.map(
            lambda e, p, u: (decay * e.astype(jnp.float32) + (1 - decay) * (
                p.astype(jnp.float32) + u.astype(jnp.float32))).astype(e.dtype),
            state.ema, params, updates)  # fmt: skip
        return updates, EmaState(ema)

    return optax.GradientTransformation(init, update)


def ema_of(opt_state) -> Any:
    """The EMA parameters in an optimizer state that chains `ema_tracker` (ValueError if none)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState))
             if isinstance(x, EmaState)]  # fmt: skip
    if len(found) != 1:
        raise ValueError(f"expected one ema_tracker state in the optimizer state, found {len(found)}")
    return found[0].ema


def live_teacher(objective: Callable) -> Callable:
    """An OPD objective `(params, batch, teacher_params)` turned into `(params, batch)` whose
    teacher is the current policy itself under stop_gradient."""

    def objective_live(params, batch):
        return objective(params, batch, jax.lax.stop_gradient(params))

    return objective_live


__all__ = ["SELF_TEACHERS", "EmaState", "ema_of", "ema_tracker", "live_teacher",
           "topk_opd_objective", "topk_teacher"]
