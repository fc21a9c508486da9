"""On-policy states: a step's prompts, sampled by the current policy, as one padded batch.

The on-policy loop (`loops.run_on_policy`) asks `sample_step` for step t's batch: it picks the
step's prompts (a function of (seed, t) alone), pads them once to the run-wide width, samples
`group_size` completions of each with the sampler, and returns a `data.CompletionBatch` whose
prompt arrays are the very arrays the sampler saw (never padded a second time) plus the host-side
completions a scorer needs (rewards, pass rates).

Several processes: each process builds and samples only the rows its devices hold
(`distributed.local_rows`), whole groups at a time, so a host never sees another host's prompts;
the sampler runs one SPMD program over the global mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxpost import data, distributed, losses, sampler
from jaxpost.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are sampled (separate from how long the loop runs).

    Attributes:
      group_size: completions per prompt (GRPO's group; OPD's rollouts per prompt).
      max_new_tokens: the completion budget M.
      temperature, top_k, top_p: the sampling distribution (temperature 0 is greedy).
    """

    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.group_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"group_size and max_new_tokens must be >= 1, got {self.group_size}, "
                             f"{self.max_new_tokens}")  # fmt: skip
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """The prompts an on-policy loop samples from, and how to check what comes back.

    Attributes:
      prompts: the training pool, each already tokenized (the student's view).
      reward: (index into `prompts`, completion token ids) -> float (GRPO's reward; OPD logs
        it as the rollouts' pass rate).
      teacher_prompts: the teacher's view of each prompt (OPSD's privileged context), or None.
      teacher_feedback: (index into `prompts`, completion token ids) -> the teacher's view of
        that row: a privileged context that depends on the attempt itself (a verifier's message
        on it, as in self-distillation from feedback), built after sampling; None: none. Its
        views are left-padded to `teacher_width` (a longer one is an error).
      eos_id, pad_id: the tokenizer's.
    """

    prompts: Sequence[Sequence[int]]
    reward: Callable[[int, Sequence[int]], float] | None = None
    teacher_prompts: Sequence[Sequence[int]] | None = None
    eos_id: int | None = None
    pad_id: int = 0
    teacher_feedback: Callable[[int, Sequence[int]], Sequence[int]] | None = None
    teacher_width: int = 0

    def __post_init__(self):
        if self.teacher_feedback is not None and (self.teacher_prompts is not None
                                                  or self.teacher_width < 1):  # fmt: skip
            raise ValueError("teacher_feedback replaces teacher_prompts and needs teacher_width")

    @property
    def privileged(self) -> bool:
        """Whether the teacher sees its own view of the prompt."""
        return self.teacher_prompts is not None or self.teacher_feedback is not None

    def width(self, teacher: bool = False, multiple: int = 16) -> int:
        """The run-wide padded width of (teacher) prompts: one shape for every step."""
        if teacher and self.teacher_feedback is not None:
            return data.round_up(self.teacher_width, multiple)
        pool = self.teacher_prompts if teacher else self.prompts
        return data.round_up(max(len(p) for p in pool), multiple)


@dataclasses.dataclass
class StepRollouts:
    """This process's rows of one step: the training batch and what scorers read on the host.

    `problems[r]` is the prompt index of row r; `completions[r]` its token ids up to and
    including the stop token; `batch` the padded arrays (numpy, this process's rows).
    """

    batch: data.CompletionBatch
    problems: list[int]
    completions: list[list[int]]
    entropy: np.ndarray  # [rows, M] per-token entropy of the untempered policy
    rows: slice  # which rows of the step's global batch these are (`distributed.local_rows`)
    rewards: np.ndarray | None = None  # [rows] the verifier's, once scored (`shaping.collect`)
    trained: np.ndarray | None = None  # [rows] bool: False on dynamic sampling's filler rows


def step_prompts(source: PromptSource, batch_size: int, seed: int, step: int,
                 round: int = 0) -> list[int]:  # fmt: skip
    """The prompt indices of step `step`: a permutation of the pool drawn from (seed, step), and
    for a later sampling round of the step (dynamic sampling) from (seed, step, round)."""
    n = len(source.prompts)
    perm = np.random.default_rng([seed, 7, step] + ([round] if round else [])).permutation(n)
    return [int(perm[i % n]) for i in range(batch_size)]


def sample_step(config: ModelConfig, params, source: PromptSource, sampling: SamplingConfig, *,
                batch_size: int, seed: int, step: int, mesh=None, round: int = 0) -> StepRollouts:  # fmt: skip
    """Sample `group_size` completions of step `step`'s prompts with `params` (this process's
    rows); the prompts and the sampler's seed are functions of (seed, step, round)."""
    G = sampling.group_size
    rows = batch_size * G
    mine = distributed.local_rows(mesh, rows)
    if mine.start % G or mine.stop % G:
        raise ValueError(f"a process's rows ({mine.start}..{mine.stop}) must hold whole groups of "
                         f"{G}: use a batch of prompts divisible by the process count")  # fmt: skip
    chosen = step_prompts(source, batch_size, seed, step, round)[mine.start // G : mine.stop // G]
    problems = [i for i in chosen for _ in range(G)]
    prompt, prompt_mask = data.left_pad([source.prompts[i] for i in problems], source.width(),
                                        source.pad_id)  # fmt: skip
    out = sampler.generate_rows(
        config, params, prompt, prompt_mask, np.arange(mine.start, mine.stop, dtype=np.int32),
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, eos_id=source.eos_id, pad_id=source.pad_id,
        seed=(seed * 1_000_003 + step + round * 104_729) % (2**31), with_entropy=True, mesh=mesh,
    )  # fmt: skip
    batch = data.CompletionBatch(
        prompt_tokens=prompt, prompt_mask=prompt_mask, completion=out.tokens,
        completion_mask=out.mask, old_logp=out.logprobs, sampling_logp=out.sample_logprobs,
    )  # fmt: skip
    completions = [out.tokens[r, : int(out.lengths[r])].tolist() for r in range(len(problems))]
    if source.privileged:
        if source.teacher_feedback is not None:
            views = [source.teacher_feedback(i, c) for i, c in zip(problems, completions)]
        else:
            views = [source.teacher_prompts[i] for i in problems]
        t, tm = data.left_pad(views, source.width(teacher=True), source.pad_id)
        batch = batch.replace(teacher_prompt_tokens=t, teacher_prompt_mask=tm)
    return StepRollouts(batch, problems, completions, out.entropy, mine)


def take(picks: Sequence[tuple[StepRollouts, int]]) -> StepRollouts:
    """A step's rollouts made of (rollouts, row) picks, in order: rows of several sampling rounds
    of one step (same widths) as one batch; `rows` is the first pick's (this process's block)."""
    first = picks[0][0]

    def rows_of(field):
        return np.stack([np.asarray(field(r))[i] for r, i in picks])

    batch = jax.tree.map(lambda *rows: np.stack(rows),
                         *[jax.tree.map(lambda x, i=i: np.asarray(x)[i], r.batch) for r, i in picks])  # fmt: skip
    rewards = None if first.rewards is None else rows_of(lambda r: r.rewards)
    return StepRollouts(batch, [r.problems[i] for r, i in picks],
                        [r.completions[i] for r, i in picks], rows_of(lambda r: r.entropy),
                        first.rows, rewards)  # fmt: skip


def rollout_metrics(r: StepRollouts) -> dict[str, float]:
    """Completion length, mean entropy and sampled tokens over all processes' rows."""
    mask = np.asarray(r.batch.completion_mask, bool)
    totals = distributed.all_hosts(np.asarray(
        [[mask.sum(), (r.entropy * mask).sum(), len(r.problems)]], np.float64))  # fmt: skip
    tokens, entropy, rows = np.asarray(totals).sum(0)
    return {"completion_len": tokens / max(rows, 1), "entropy": entropy / max(tokens, 1),
            "sampled_tokens": tokens}  # fmt: skip


def advantages(rewards: np.ndarray, rows: slice, group_size: int, scale: str) -> np.ndarray:
    """GRPO's advantages (`losses.group_advantages`) of this process's `rows` of a step, computed
    over the whole step's batch: a "batch" scale divides by one std over every process's
    rewards, not this host's. A collective under several processes (`distributed.gather_rows`)."""
    everyone = distributed.gather_rows(np.asarray(rewards, np.float32), rows)
    adv, _ = losses.group_advantages(everyone, group_size, scale=scale)
    adv = np.asarray(adv)
    return adv[rows] if len(adv) > len(rewards) else adv


def rewards(source: PromptSource, r: StepRollouts) -> np.ndarray:
    """The verifier's reward of every row (float32; the ones already scored when set); a
    non-finite reward is an error."""
    if r.rewards is not None:
        return np.asarray(r.rewards, np.float32)
    values = np.asarray([source.reward(i, c) for i, c in zip(r.problems, r.completions)],
                        np.float32)  # fmt: skip
    if not np.all(np.isfinite(values)):
        raise ValueError(f"non-finite reward: {values[~np.isfinite(values)]}")
    return values


__all__ = ["PromptSource", "SamplingConfig", "StepRollouts", "rewards", "rollout_metrics",
           "sample_step", "step_prompts", "take"]  # fmt: skip
