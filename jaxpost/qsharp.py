"""Q♯: value-guided decoding of a frozen base with the optimal soft Q of a 0/1 reward.

"Q♯: Provably Optimal Distributional RL for LLM Post-Training" (Zhou et al., NeurIPS 2025; code
jinpz/q_sharp) keeps the reference policy π_ref frozen. For the KL-regularised objective
max_π E[r] − (1/η)·KL(π ‖ π_ref) the optimal policy is π*(a|s) ∝ π_ref(a|s)·exp(Q*(s, a)) with
Q*(s, a) = log E_{π_ref}[e^{η·r} | s, a]: the soft Q is a function of the *distribution* of
π_ref's return, learned by regression on π_ref's own rollouts. For a 0/1 reward that
distribution is one number, p(s) = P(success | s) under π_ref, and

    Q(s, a) = log(1 − p + p·e^η),    p = σ(value logit of s + a)

(`q_values`; `token_choice.q_from_logits` from the logit, stably at any η). Decoding then draws
from π(a|s) ∝ π_ref(a|s)·exp(Q(s, a)) restricted to π_ref's top-k next tokens (defaults: top_k =
20, η = 10): `sampler.generate(..., guide=Guide(...))`, teacher-forced `guided_logits`. The
base's weights never change, so whatever it knew it still knows.

Ours, where the paper or its code leave a choice:
  * the value model is a copy of the base transformer with a linear scalar head on its
    final-normed hidden state (`init_value`, w = 0: p = σ(bias) everywhere at the start);
  * the regression is the binary cross-entropy of σ(logit) against the row's outcome at every
    completion prefix, each row normalised by its length then averaged over rows
    (`value_objective`); the released code regresses on prefixes cut at one random position,
    which is the same data with more variance;
  * temperature divides the base's logits only: the sampler draws from
    (logits / τ) + Q on the top-k, and its `logprobs` are those of the untempered guided policy.

    value = train_value(config, base_params, source, optim, loop, sampling).params
    guide = sampler.Guide(config, value, top_k=20, eta=10.0)
    out = sampler.generate(config, base_params, prompts, ..., guide=guide)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import data, models, objectives, rollouts, train
from jaxpost.models import ModelConfig
from jaxpost.on_policy import run_on_policy
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig, RunResult
from jaxpost.token_choice import (  # noqa: F401  (re-exported: qsharp.Guide, ...)
    Guide,
    candidate_values,
    q_from_logits,
    scratch_cache,
    value_head,
)


def init_value(base_params, *, bias: float = 0.0) -> dict:
    """The value tree {"model": a copy of the base's parameters, "head": {"w": [D] zeros,
    "b": bias}}, so p = σ(bias) for every prefix until it is trained."""
    d = base_params["embed"].shape[1]
    head = {"w": jnp.zeros((d,), jnp.float32), "b": jnp.asarray(bias, jnp.float32)}
    return {"model": jax.tree.map(jnp.array, base_params), "head": head}


def q_values(p, eta):
    """Q = log(1 − p + p·e^η) for p ∈ [0, 1]: log1p(p·expm1(η)) up to η = 20 (exactly 0 at η = 0
    or p = 0), logaddexp(log(1 − p), log p + η) beyond (no overflow at large η)."""
    p = jnp.asarray(p, jnp.result_type(p, jnp.float32))
    eta = jnp.asarray(eta, p.dtype)
    small = jnp.log1p(p * jnp.expm1(jnp.minimum(eta, 20.0)))
    large = jnp.logaddexp(jnp.log1p(-p), jnp.log(p) + eta)
    return jnp.where(eta <= 20.0, small, large)


def value_logits(config: ModelConfig, value_params, prompt_NxP, prompt_mask_NxP, completion_NxM,
                 completion_mask_NxM) -> jax.Array:  # fmt: skip
    """[N, M] the logit of p after reading completion token t: the value head on the hidden state
    of slot P + t of prompt ++ completion (prompts left-padded, completions right-padded)."""
    P, M = prompt_NxP.shape[1], completion_NxM.shape[1]
    tokens = jnp.concatenate([prompt_NxP, completion_NxM], axis=1)
    mask = jnp.concatenate([prompt_mask_NxP, completion_mask_NxM], axis=1)
    hidden = models.hidden_states(config, value_params["model"], tokens, mask)
    return value_head(jax.lax.slice_in_dim(hidden, P, P + M, axis=1), value_params["head"])


def value_objective(config: ModelConfig) -> train.Objective:
    """`(value_params, batch) -> (loss, aux)`: binary cross-entropy of σ(value logit) against the
    row's 0/1 outcome, which rides in `batch.advantages` ([N] float32), at every completion
    position (`completion_mask`); each row's mean over its tokens, then the mean over rows.
    The all-prefix form is ours (the released code cuts each rollout at one random prefix).
    aux: `value_bce` (the loss), `value_acc` (sign of the logit agrees with the label,
    token-weighted), `label_mean`."""

    def objective(value_params, batch: data.CompletionBatch):
        x = value_logits(config, value_params, batch.prompt_tokens, batch.prompt_mask,
                         batch.completion, batch.completion_mask)  # fmt: skip
        y = jnp.asarray(batch.advantages, jnp.float32)[:, None]
        m = batch.completion_mask.astype(jnp.float32)
        bce = jax.nn.softplus(x) - y * x  # −[y log σ(x) + (1 − y) log σ(−x)]
        per_row = jnp.sum(bce * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        loss = jnp.mean(per_row)
        agree = ((x > 0) == (y > 0.5)).astype(jnp.float32)
        acc = jnp.sum(agree * m) / jnp.maximum(jnp.sum(m), 1.0)
        return loss, {"value_bce": loss, "value_acc": acc, "label_mean": jnp.mean(y)}

    return objective


def train_value(config: ModelConfig, base_params, source: PromptSource, optim: train.OptimConfig,
                loop: LoopConfig, sampling: SamplingConfig, *, mesh=None,
                loss_impl: str = "auto", value_params=None) -> RunResult:  # fmt: skip
    """The value model regressed on rollouts of the frozen base (`value_objective`), through
    `run_on_policy` (checkpoint resume, preemption, divergence): each step samples the step's
    prompts with `base_params`, never the trained tree, and labels each row by the verifier's
    reward > 0. `value_params`: the start (default `init_value(base_params)`). `mesh` splits
    the base's sampling over its data axes; the value model's step runs on one device. The
    head never forms [N, M, V] logits, so `loss_impl` only has to name a path. Host metric:
    `reward` (the rollouts' mean outcome). The result's `params` are the value tree. One process,
    no LoRA."""
    if source.reward is None or jax.process_count() > 1:
        raise ValueError("train_value needs a reward function and runs in one process")
    objectives.resolve_loss_impl(loss_impl, config)
    kw = dict(batch_size=loop.batch_size, seed=loop.seed, mesh=mesh)

    def collect(_value_params, step):
        return rollouts.sample_step(config, base_params, source, sampling, step=step, **kw), {}

    def score(r: rollouts.StepRollouts):
        outcome = (rollouts.rewards(source, r) > 0).astype(np.float32)
        b = r.batch
        batch = data.CompletionBatch(prompt_tokens=b.prompt_tokens, prompt_mask=b.prompt_mask,
                                     completion=b.completion, completion_mask=b.completion_mask,
                                     advantages=outcome)  # fmt: skip
        return batch, {"reward": float(outcome.mean())}

    start = init_value(base_params) if value_params is None else value_params
    return run_on_policy(config, start, source, value_objective(config), score, optim, loop,
                         sampling, collect=collect)  # fmt: skip


@functools.partial(jax.jit, static_argnums=0, static_argnames="top_k")
def guided_logits(config: ModelConfig, base_params, value_params, prompt_NxP, prompt_mask_NxP,
                  completion_NxM, completion_mask_NxM, *, eta, top_k: int
                  ) -> jax.Array:  # fmt: skip
    """[N, M, V] float32, teacher-forced: the guided policy's logits at every completion position
    (the distribution completion token t was drawn from), base logits + Q(s, a) on the base's
    top-k tokens there, −inf elsewhere.

    One value-model pass over prompt ++ completion fills a cache of P + M + M·k slots; the M·k
    (position, candidate) pairs are then scored together as extra query tokens in the last M·k
    slots (`token_choice.candidate_values`): the candidate for position t attends the real slots
    before P + t and itself only, so it sees what the sampler's candidate saw at step t.
    """
    N, P = prompt_NxP.shape
    M = completion_NxM.shape[1]
    base = objectives.completion_logits(config, base_params, prompt_NxP, prompt_mask_NxP,
                                        completion_NxM, completion_mask_NxM)  # fmt: skip
    k = min(top_k, base.shape[-1])
    base_k, idx = jax.lax.top_k(base, k)  # [N, M, k]
    tokens = jnp.concatenate([prompt_NxP, completion_NxM], axis=1)
    mask = jnp.concatenate([prompt_mask_NxP, completion_mask_NxM], axis=1)
    cache = scratch_cache(config, N, P + M + M * k)
    _, cache = models.forward_cached(config, value_params["model"], tokens,
                                     models.positions_from_mask(mask), mask, cache, 0,
                                     last_only=True)  # fmt: skip
    prompt_len = jnp.sum(prompt_mask_NxP, axis=1).astype(jnp.int32)
    positions = jnp.repeat(prompt_len[:, None] + jnp.arange(M, dtype=jnp.int32)[None, :], k, axis=1)
    before_C = jnp.repeat(P + jnp.arange(M), k)  # candidate (t, j) sees the slots before P + t
    before_CxS = jnp.arange(cache.capacity)[None, :] < before_C[:, None]
    sees = cache.valid_BxS[:, None, :] & before_CxS[None]
    x, _ = candidate_values(config, value_params, idx.reshape(N, M * k), positions, sees, cache,
                            P + M)  # fmt: skip
    guided_k = base_k + q_from_logits(x.reshape(N, M, k), eta)
    rows, cols = jnp.arange(N)[:, None, None], jnp.arange(M)[None, :, None]
    return jnp.full(base.shape, -jnp.inf, jnp.float32).at[rows, cols, idx].set(guided_k)


def guided_rows(config, prompt_len: int, completion_len: int, top_k: int,
                budget: int = 1 << 30) -> int:  # fmt: skip
    """Rows per teacher-forced guided pass (`qsharp.guided_logits`) within `budget` bytes of
    its two largest temporaries: the candidates' attention scores [rows, heads, M·k, P+M+M·k]
    and three [rows, M, V] float32 logit arrays."""
    k = min(top_k, config.vocab_size)
    mk = completion_len * k
    per_row = 4 * (config.n_heads * mk * (prompt_len + completion_len + mk)
                   + 3 * completion_len * config.vocab_size)  # fmt: skip
    return max(1, budget // per_row)



def guided_logprobs(config: ModelConfig, base_params, value_params, prompt_NxP, prompt_mask_NxP,
                    completion_NxM, completion_mask_NxM, *, eta, top_k: int
                    ) -> jax.Array:  # fmt: skip
    """[N, M] log-probabilities of the completion tokens under the guided policy (log_softmax of
    `guided_logits`; −inf where a token lies outside the base's top-k)."""
    logits = guided_logits(config, base_params, value_params, prompt_NxP, prompt_mask_NxP,
                           completion_NxM, completion_mask_NxM, eta=eta, top_k=top_k)  # fmt: skip
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(completion_NxM)[..., None], axis=-1)[..., 0]


__all__ = ["Guide", "guided_logits", "guided_logprobs", "guided_rows",
           "init_value", "q_from_logits", "q_values", "train_value", "value_logits",
           "value_objective"]  # fmt: skip
