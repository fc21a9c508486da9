"""Sparse policy selection: RL's effect without RL, at the base's high-entropy decision points.

"Rethinking RL for LLM Reasoning: It's Sparse Policy Selection" (2605.06241; code
ReasonMaxxer) finds that RL changes the base's argmax at 1-3% of positions, to tokens already in
its top-5, where the base is uncertain, and replaces RL by a cheap offline step on cached base
rollouts:

  1. sample the base once: `problems` prompts × G rollouts, verified;
  2. keep the `keep` problems with both correct and incorrect rollouts whose pass rate is
     nearest 0.5; each rollout's advantage A = (r - mean) / std within its group (population std),
     clipped to ±2.5;
  3. train on them: at decision positions D (the base's entropy above `tau` nats, an absolute
     threshold) the rollout's own token is pushed up (A > 0) or down (A < 0) by A · CE; every
     other completion position is anchored to the base by KL(π_base ‖ π_θ) over the vocabulary:

         L = mean over rollouts [ Σ_{t∈D} A·CE_t / |D| + kl_coef · Σ_{t∉D} KL_t / |N| ]

`decision_loss` is that loss on logits; `run` the whole arm. Ours, not the paper's: the KL
anchor covers completion positions only (the code also anchors the prompt's); no trimming of the
longest 20% of rollouts and no fixed curriculum order (a seeded shuffle per epoch); full
training or the run's LoRA rather than the paper's LoRA on q/k/v/o; `epochs` passes over the
pool, capped at the loop's steps. The step computes both models' logits over the whole
vocabulary ([rows, M, V] each): fine for the built-in models, heavy at a 150k vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import data, objectives, rollouts, train
from jaxpost.lora import LoraConfig
from jaxpost.models import ModelConfig
from jaxpost.on_policy import run_on_policy
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig, RunResult

ADV_CLIP = 2.5  # the released code's advantage clip


def decision_loss(base_logits_NxMxV, logits_NxMxV, tokens_NxM, mask_NxM, advantages_N, *,
                  tau: float, kl_coef: float = 0.2):  # fmt: skip
    """(loss, aux): the decision loss above. aux: `decision_frac` (decision positions / all),
    `decision_ce` and `anchor_kl` (their means over positions)."""
    dt = jnp.result_type(logits_NxMxV.dtype, jnp.float32)
    base = jax.lax.stop_gradient(jax.nn.log_softmax(base_logits_NxMxV.astype(dt), axis=-1))
    logp = jax.nn.log_softmax(logits_NxMxV.astype(dt), axis=-1)
    p_base = jnp.exp(base)
    entropy = -jnp.sum(p_base * base, axis=-1)
    m = mask_NxM.astype(bool)
    d = m & (entropy > tau)
    n = m & ~d
    ce = -jnp.take_along_axis(logp, tokens_NxM[..., None], axis=-1)[..., 0]
    kl = jnp.sum(p_base * (base - logp), axis=-1)
    adv = jnp.asarray(advantages_N, dt)[:, None]
    dec = jnp.where(d, adv * ce, 0.0).sum(1) / jnp.maximum(d.sum(1), 1)
    anchor = jnp.where(n, kl, 0.0).sum(1) / jnp.maximum(n.sum(1), 1)
    loss = jnp.mean(dec + kl_coef * anchor)
    count = jnp.maximum(m.sum(), 1)
    aux = {"decision_frac": d.sum() / count,
           "decision_ce": jnp.where(d, ce, 0.0).sum() / jnp.maximum(d.sum(), 1),
           "anchor_kl": jnp.where(n, kl, 0.0).sum() / jnp.maximum(n.sum(), 1)}  # fmt: skip
    return loss, jax.lax.stop_gradient(aux)


def objective(config: ModelConfig, *, tau: float, kl_coef: float = 0.2) -> train.Objective:
    """`decision_loss` on a `data.CompletionBatch` with `advantages`; the base's parameters are
    the third argument (a frozen input, never trained)."""

    def fn(params, batch: data.CompletionBatch, base_params):
        args = (batch.prompt_tokens, batch.prompt_mask, batch.completion, batch.completion_mask)
        base = objectives.completion_logits(config, base_params, *args)
        logits = objectives.completion_logits(config, params, *args)
        return decision_loss(base, logits, batch.completion, batch.completion_mask,
                             batch.advantages, tau=tau, kl_coef=kl_coef)  # fmt: skip

    return fn


def group_advantages(rewards_N, group_size: int) -> np.ndarray:
    """(r - mean) / (population std + 1e-8) within each group, clipped to ±2.5."""
    r = np.asarray(rewards_N, np.float64).reshape(-1, group_size)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-8)
    return np.clip(adv, -ADV_CLIP, ADV_CLIP).reshape(-1).astype(np.float32)


def select_groups(rewards_N, group_size: int, keep: int) -> tuple[list[int], int]:
    """The (up to) `keep` groups with mixed outcomes whose pass rate is nearest 0.5, by that
    distance then index; and how many groups were mixed. Without any mixed group, the groups
    nearest 0.5 all the same (their advantages are 0: the arm then only anchors to the base)."""
    r = np.asarray(rewards_N, np.float64).reshape(-1, group_size)
    mixed = np.flatnonzero(r.max(1) > r.min(1))
    pool = mixed if len(mixed) else np.arange(len(r))
    order = sorted(pool.tolist(), key=lambda g: (abs(r[g].mean() - 0.5), g))
    return order[:keep], len(mixed)


def build_pool(config: ModelConfig, params, source: PromptSource, sampling: SamplingConfig, *,
               problems: int, keep: int, seed: int, mesh=None) -> tuple[rollouts.StepRollouts, dict]:  # fmt: skip
    """Steps 1-2: the cached base rollouts of the kept problems, with advantages; metrics."""
    G = sampling.group_size
    problems = min(problems, len(source.prompts))
    r = rollouts.sample_step(config, params, source, sampling, batch_size=problems, seed=seed,
                             step=0, mesh=mesh)  # fmt: skip
    rewards = rollouts.rewards(source, r)
    groups, mixed = select_groups(rewards, G, keep)
    adv = group_advantages(rewards, G)
    rows = [g * G + j for g in groups for j in range(G)]
    pool = rollouts.take([(r, i) for i in rows])
    pool.batch = pool.batch.replace(advantages=adv[rows])
    pool.rewards = rewards[rows]
    return pool, {"pool_problems": len(groups), "pool_mixed_problems": mixed,
                  "pool_pass_rate": float(rewards[rows].mean())}  # fmt: skip


def step_rows(pool_rows: int, rows: int, seed: int, step: int) -> np.ndarray:
    """The pool rows of step `step` (1-based, the loop's): consecutive slices of a seeded shuffle per epoch,
    a function of (seed, step) alone so a resumed run replays the same batches."""
    idx = np.arange((step - 1) * rows, step * rows)
    epochs = idx // pool_rows
    perms = {e: np.random.default_rng([seed, 11, e]).permutation(pool_rows) for e in set(epochs)}
    return np.asarray([perms[e][i % pool_rows] for e, i in zip(epochs, idx)])


def run(config: ModelConfig, params, source: PromptSource, optim: train.OptimConfig,
        loop: LoopConfig, sampling: SamplingConfig, *, tau: float, kl_coef: float = 0.2,
        problems: int = 128, keep: int = 64, epochs: float = 2.0, mesh=None,
        lora: LoraConfig | None = None) -> RunResult:  # fmt: skip
    """The arm: the pool sampled from `params` (the base, which also anchors), then
    min(loop.steps, ceil(epochs · pool / rows)) steps of `loop.batch_size × group_size` rows.
    One process."""
    if not tau >= 0 or not kl_coef >= 0 or not epochs > 0:
        raise ValueError(f"sparse selection needs tau >= 0, kl_coef >= 0 and epochs > 0, got "
                         f"{tau}, {kl_coef}, {epochs}")  # fmt: skip
    if jax.process_count() > 1:
        raise ValueError("sparse selection runs in one process")
    pool, info = build_pool(config, params, source, sampling, problems=problems, keep=keep,
                            seed=loop.seed, mesh=mesh)  # fmt: skip
    rows = loop.batch_size * sampling.group_size
    n = len(pool.problems)
    steps = max(1, min(loop.steps, math.ceil(epochs * n / rows)))
    loop = dataclasses.replace(loop, steps=steps, checkpoint_every=min(loop.checkpoint_every, steps))
    optim = dataclasses.replace(optim, total_steps=steps,
                                warmup_steps=min(optim.warmup_steps, steps))  # fmt: skip

    def collect(_params, step):
        return rollouts.take([(pool, int(i)) for i in step_rows(n, rows, loop.seed, step)]), info

    return run_on_policy(config, params, source, objective(config, tau=tau, kl_coef=kl_coef),
                         lambda r: (r.batch, {}), optim, loop, sampling,
                         frozen=[(config, params)], mesh=mesh, collect=collect, lora=lora)  # fmt: skip
