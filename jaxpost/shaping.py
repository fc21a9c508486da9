"""GRPO practice on the host: which rollouts a step trains on, which tokens count, and how rewards
are shaped. The pieces RL users of TRL, verl and DAPO rely on, each off by default:

  dynamic sampling     DAPO (Yu et al., 2025): a group whose G rewards are all equal has zero
                       advantage everywhere and only dilutes the token mean; such groups are
                       dropped and the step samples more prompts (up to `max_rounds` sampling
                       rounds) until the batch holds `batch_size` informative groups. If the
                       rounds run out, the remaining slots keep dropped groups with a zero loss
                       mask: the batch keeps its shape (one compiled step) and no all-equal
                       group is ever trained on. (A step that found none at all has a zero
                       gradient; Adam's momentum from earlier steps still moves the weights.)
  truncation masking   DAPO's overlong filtering: a completion that hit `max_new_tokens` without
                       its stop token is left out of the loss (its reward judges a text the
                       model never finished).
  overlong penalty     DAPO's soft overlong punishment, added to the reward: with L = max_new_tokens
                       and a window c = `overlong_buffer`, a completion of |y| tokens gets
                       0 when |y| ≤ L − c, −factor·(|y| − (L − c))/c inside the window, and
                       −factor when truncated (it would have run past L).
  entropy mask         Wang et al., 2025 ("Beyond the 80/20 rule"): only the top `entropy_top_frac`
                       of the step's completion tokens by the sampling policy's entropy (the
                       "forking" tokens) carry gradient; the threshold is taken over the whole
                       step's batch, every process's rows.

The entropy bonus lives in the objective (`objectives.grpo_objective(entropy_coef=...)`): it needs
the current policy's entropy under autodiff, not the sampler's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxpost import data, distributed, rollouts


@dataclasses.dataclass(frozen=True)
class Shaping:
    """Which GRPO practices a run uses (module docstring); the defaults change nothing."""

    dynamic_sampling: bool = False
    max_rounds: int = 4  # sampling rounds per step at most (DAPO's max_num_gen_batches)
    mask_truncated: bool = False
    overlong_buffer: int = 0  # the penalty window c in tokens (0: no overlong penalty)
    overlong_factor: float = 1.0
    entropy_top_frac: float = 1.0  # fraction of tokens trained, by entropy (1: all)

    def __post_init__(self):
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if self.overlong_buffer < 0 or not self.overlong_factor >= 0:
            raise ValueError(f"overlong_buffer and overlong_factor must be >= 0, got "
                             f"{self.overlong_buffer}, {self.overlong_factor}")  # fmt: skip
        if not 0 < self.entropy_top_frac <= 1:
            raise ValueError(f"entropy_top_frac must lie in (0, 1], got {self.entropy_top_frac}")

    def check_budget(self, max_new_tokens: int) -> None:
        """ValueError when the overlong window is not shorter than the completion budget."""
        if self.overlong_buffer >= max_new_tokens:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) must be shorter than "
                             f"max_new_tokens ({max_new_tokens})")  # fmt: skip


def truncated(completions, max_new_tokens: int, eos_id: int | None) -> np.ndarray:
    """bool [N]: the completion used the whole budget without ending in the stop token."""
    return np.asarray([len(c) >= max_new_tokens and (eos_id is None or c[-1] != eos_id)
                       for c in completions], bool)  # fmt: skip


def overlong_penalty(lengths, is_truncated, max_len: int, buffer: int,
                     factor: float = 1.0) -> np.ndarray:  # fmt: skip
    """DAPO's soft overlong punishment (module docstring), float64 [N]; zeros when buffer = 0."""
    lengths = np.asarray(lengths, np.float64)
    if buffer <= 0:
        return np.zeros_like(lengths)
    start = max_len - buffer
    penalty = -factor * np.clip(lengths - start, 0, buffer) / buffer
    return np.where(np.asarray(is_truncated, bool), -factor, penalty)


def entropy_top_mask(entropy_NxM, mask_NxM, frac: float) -> np.ndarray:
    """float32 [N, M]: 1 on the ceil(frac · n) valid tokens of highest entropy (n valid tokens;
    every token tied with the last one kept too), 0 elsewhere. frac = 1 returns the mask."""
    mask = np.asarray(mask_NxM) > 0
    if frac >= 1 or not mask.any():
        return mask.astype(np.float32)
    entropy = np.asarray(entropy_NxM, np.float64)
    values = np.sort(entropy[mask])[::-1]
    threshold = values[max(math.ceil(frac * len(values)), 1) - 1]
    return (mask & (entropy >= threshold)).astype(np.float32)


def informative_groups(rewards_N, group_size: int) -> np.ndarray:
    """bool [N / G]: the group's rewards are not all equal (its advantages are not all 0)."""
    r = np.asarray(rewards_N, np.float64).reshape(-1, group_size)
    return r.max(axis=1) > r.min(axis=1)


def collect(config, params, source: rollouts.PromptSource, sampling: rollouts.SamplingConfig,
            shaping: Shaping, *, batch_size: int, seed: int, step: int,
            mesh=None) -> tuple[rollouts.StepRollouts, dict]:  # fmt: skip
    """Step `step`'s rollouts with their rewards; with dynamic sampling, only informative groups
    (module docstring), filled from up to `max_rounds` rounds of fresh prompts.

    Every process runs the same number of rounds (the sampler is one SPMD program): a round is
    taken while any process still lacks groups. Returns the rollouts (rows of dropped groups kept
    as filler marked in `trained`) and metrics: `ds_rounds`, `ds_informative_frac` (of the groups
    sampled), `ds_filler_groups` (slots no informative group filled), and the policy's `reward`
    and `pass_rate` over every row sampled this step.
    """
    G = sampling.group_size
    kw = dict(batch_size=batch_size, seed=seed, step=step, mesh=mesh)
    mine = distributed.local_rows(mesh, batch_size * G)
    need = (mine.stop - mine.start) // G  # this process's groups
    parts, kept, dropped = [], [], []
    for k in range(shaping.max_rounds if shaping.dynamic_sampling else 1):
        r = rollouts.sample_step(config, params, source, sampling, round=k, **kw)
        r.rewards = rollouts.rewards(source, r)
        parts.append(r)
        ok = informative_groups(r.rewards, G) if shaping.dynamic_sampling else np.ones(need, bool)
        kept += [(k, g) for g in np.flatnonzero(ok)]
        dropped += [(k, g) for g in np.flatnonzero(~ok)]
        short = np.asarray(distributed.all_hosts(np.asarray([[need - len(kept)]], np.int64)))
        if short.max() <= 0:
            break
    chosen = kept[:need]
    filler = need - len(chosen)
    chosen += dropped[:filler]
    if chosen == [(0, g) for g in range(need)]:
        out = parts[0]  # every group of the first round, in order: nothing to gather
    else:
        out = rollouts.take([(parts[k], g * G + j) for k, g in chosen for j in range(G)])
    out.trained = np.arange(need * G) < (need - filler) * G
    everything = np.concatenate([p.rewards for p in parts])
    totals = np.asarray(distributed.all_hosts(np.asarray(
        [[everything.sum(), (everything > 0).sum(), len(everything), len(kept) + len(dropped),
          len(kept), filler]], np.float64))).sum(0)  # fmt: skip
    info = {"reward": totals[0] / totals[2], "pass_rate": totals[1] / totals[2]}
    if shaping.dynamic_sampling:
        info.update(ds_rounds=float(len(parts)), ds_informative_frac=totals[4] / totals[3],
                    ds_filler_groups=totals[5])  # fmt: skip
    return out, info


def grpo_batch(source: rollouts.PromptSource, r: rollouts.StepRollouts, sampling, shaping: Shaping,
               *, advantage_scale: str = "group", reward_transform=None, advantage_fn=None,
               ) -> tuple[data.CompletionBatch, dict]:  # fmt: skip
    """The training batch of a step's rollouts (rewards set by `collect`): shaped rewards, group
    advantages over the whole step, and the loss mask (filler groups, truncated completions,
    low-entropy tokens out). Metrics: `truncated_frac`, `trained_token_frac` when a mask applies.
    `advantage_fn`: (rollouts, shaped rewards) -> (advantages, metrics) instead of GRPO's group
    advantages (e.g. α-DPG's, `loops.run_alpha_dpg`).
    """
    G, M = sampling.group_size, sampling.max_new_tokens
    rewards = np.asarray(r.rewards, np.float32)
    batch = r.batch
    if reward_transform is not None:
        seq_logp = (batch.old_logp * batch.completion_mask).sum(1)
        rewards = np.asarray(reward_transform(rewards, seq_logp), np.float32)
    cut = truncated(r.completions, M, source.eos_id)
    if shaping.overlong_buffer:
        lengths = [len(c) for c in r.completions]
        rewards = rewards + overlong_penalty(lengths, cut, M, shaping.overlong_buffer,
                                             shaping.overlong_factor).astype(np.float32)  # fmt: skip
    extra = {}
    if advantage_fn is None:
        adv = rollouts.advantages(rewards, r.rows, G, advantage_scale)
    else:
        adv, extra = advantage_fn(r, rewards)
    completion_mask = np.asarray(batch.completion_mask, np.float32)
    trained = np.ones(len(rewards), bool) if r.trained is None else r.trained
    if shaping.mask_truncated:
        trained = trained & ~cut
    mask = completion_mask * trained[:, None]
    extra = {**extra, "truncated_frac": _global_mean(cut)}
    if shaping.entropy_top_frac < 1:
        everyone = distributed.gather_rows((np.asarray(r.entropy, np.float32), mask), r.rows)
        full = entropy_top_mask(*everyone, shaping.entropy_top_frac)
        mask = full[r.rows] if len(full) > len(mask) else full
    batch = batch.replace(advantages=adv)
    if shaping.dynamic_sampling or shaping.mask_truncated or shaping.entropy_top_frac < 1:
        batch = batch.replace(loss_mask=mask.astype(np.asarray(batch.completion_mask).dtype))
        extra["trained_token_frac"] = _global_ratio(mask.sum(), completion_mask.sum())
    return batch, extra


def _global_mean(x) -> float:
    x = np.asarray(x, np.float64)
    return _global_ratio(x.sum(), x.size)


def _global_ratio(num, den) -> float:
    totals = np.asarray(distributed.all_hosts(np.asarray([[num, den]], np.float64))).sum(0)
    return float(totals[0] / max(totals[1], 1))


__all__ = ["Shaping", "collect", "entropy_top_mask", "grpo_batch", "informative_groups",
           "overlong_penalty", "truncated"]  # fmt: skip
