"""Where a trained policy's greedy choice departs from its base: the sparse footprint.

"Rethinking RL for LLM Reasoning: It's Sparse Policy Selection" (2605.06241) reads RL's effect
off the base's own rollouts: at how many positions the trained model's argmax differs from the
base's, how high the base ranked the token the trained model now prefers, and how uncertain the
base was there. `footprint` measures exactly that, for any model of the base's vocabulary:

    fp = footprint(base, base.params, model.config, params, prompts, tokens, mask, rows_per_problem)
    fp.summary["flip_frac"], fp.per_problem["flip_frac"]

Per position t of a completion (teacher-forced on the base's sample, so both models see the same
states): `flip` = argmax π(·|s_t) ≠ argmax π_base(·|s_t); `rank` = the base rank of the model's
argmax (0 = the base's own top token; ties count in the token's favour); `entropy` = the base's
entropy H(π_base(·|s_t)) in nats. Logits are computed in row chunks of bounded size; [N, M, V]
never exists for the whole evaluation. A model decoded under a guide (Q♯, `sampler.Guide`) is
compared through its guided logits (`qsharp.guided_logits`): its argmax over the base's top-k.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import data, objectives, qsharp
from jaxpost.inputs import Model
from jaxpost.models import ModelConfig

TOP_K = 5  # "already in the base's top-k": the k the summary reports
_CHUNK_ELEMENTS = 1 << 25  # logits per model per chunk (128 MiB of float32)


def position_stats(base_logits_NxMxV, logits_NxMxV):
    """(flip [N, M] bool, base rank of the model's argmax [N, M] int32, base entropy [N, M])."""
    base = base_logits_NxMxV.astype(jnp.float32)
    choice = jnp.argmax(logits_NxMxV, axis=-1)
    flip = choice != jnp.argmax(base, axis=-1)
    chosen = jnp.take_along_axis(base, choice[..., None], axis=-1)
    rank = jnp.sum(base > chosen, axis=-1, dtype=jnp.int32)
    logp = jax.nn.log_softmax(base, axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return flip, rank, entropy


@functools.cache
def _stats_fn(base_config: ModelConfig, config: ModelConfig, top_k: int | None):
    def fn(base_params, params, batch: data.CompletionBatch, guide_params=None, eta=None):
        args = (batch.prompt_tokens, batch.prompt_mask, batch.completion, batch.completion_mask)
        base = objectives.completion_logits(base_config, base_params, *args)
        if top_k is None:
            logits = objectives.completion_logits(config, params, *args)
        else:
            logits = qsharp.guided_logits(config, params, guide_params, *args, eta=eta,
                                          top_k=top_k)  # fmt: skip
        return position_stats(base, logits)

    return jax.jit(fn)


@dataclasses.dataclass
class Footprint:
    """`summary`: flip_frac (flipped positions / positions), flips, entropy_all and
    entropy_at_flips (mean base entropy over all positions / flipped ones), promoted_rank_mean,
    promoted_rank_median and promoted_in_top{TOP_K} (over flipped positions); NaN where no
    position flipped. `per_problem`: flip_frac and entropy_excess (entropy at the problem's
    flips minus at all its positions; NaN without flips), the values claims pair on."""

    summary: dict
    per_problem: dict


def summarize(flip, rank, entropy, mask, rows_per_problem: int) -> Footprint:
    """The footprint's summary and per-problem values from per-position statistics [N, M]
    (rows of one problem contiguous, `rows_per_problem` each)."""
    m = np.asarray(mask, bool)
    f = np.asarray(flip, bool) & m
    rank, entropy = np.asarray(rank, np.float64), np.asarray(entropy, np.float64)
    nan = float("nan")

    def mean(x, where):
        return float(x[where].mean()) if where.any() else nan

    summary = {
        "flip_frac": float(f.sum() / max(m.sum(), 1)),
        "flips": int(f.sum()),
        "entropy_all": mean(entropy, m),
        "entropy_at_flips": mean(entropy, f),
        "promoted_rank_mean": mean(rank, f),
        "promoted_rank_median": float(np.median(rank[f])) if f.any() else nan,
        f"promoted_in_top{TOP_K}": mean(rank < TOP_K, f),
    }
    shape = (-1, rows_per_problem * m.shape[1])
    fp, mp, ep = f.reshape(shape), m.reshape(shape), entropy.reshape(shape)
    per_problem = {
        "flip_frac": [float(a.sum() / max(b.sum(), 1)) for a, b in zip(fp, mp)],
        "entropy_excess": [mean(e, a) - mean(e, b) if a.any() else nan
                           for a, b, e in zip(fp, mp, ep)],  # fmt: skip
    }
    return Footprint(summary, per_problem)


def footprint(base: Model, base_params, config: ModelConfig, params, prompts, tokens, mask,
              rows_per_problem: int, guide=None) -> Footprint:  # fmt: skip
    """The sparse footprint of `params` (a model of `config`; decoded under `guide`, a
    `sampler.Guide`, when given) against the base, on the completions `tokens`/`mask` [N, M] of
    `prompts` (the base's own samples)."""
    if config.vocab_size != base.config.vocab_size:
        raise ValueError(f"the footprint compares argmaxes over one vocabulary; the model has "
                         f"{config.vocab_size} tokens, the base {base.config.vocab_size}")  # fmt: skip
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    fn = _stats_fn(base.config, config, None if guide is None else guide.top_k)
    extra = () if guide is None else (guide.params, guide.eta)
    chunk = max(1, _CHUNK_ELEMENTS // (tokens.shape[1] * config.vocab_size))
    width = data.round_up(max(len(p) for p in prompts), 16)
    if guide is not None:  # the candidates' attention, [rows, heads, M·k, P + M + M·k], bounds it
        chunk = min(chunk, qsharp.guided_rows(config, width, tokens.shape[1], guide.top_k))
    out = []
    for i in range(0, len(prompts), chunk):
        pt, pm = data.left_pad(prompts[i : i + chunk], width, base.tokenizer.pad_id)
        batch = data.CompletionBatch(pt, pm, tokens[i : i + chunk], mask[i : i + chunk])
        out.append(jax.device_get(fn(base_params, params, jax.tree.map(jnp.asarray, batch),
                                     *extra)))
    flip, rank, entropy = (np.concatenate(x) for x in zip(*out))
    return summarize(flip, rank, entropy, mask, rows_per_problem)
