"""OVD, on-policy verbal distillation: the teacher scores each student trajectory, the ones it
rejects are replaced by its own demonstrations, and GRPO trains on the outcome reward.

"On-policy Verbal Distillation" (2601.21968) has the teacher give each student trajectory a
discrete score 0-9 in words ("trajectory matching" instead of token-level probability
matching); trajectories under a threshold are replaced by teacher-generated ones and the student
is trained by RL on the task's reward. Its method section and code were not reachable here, so
this is the nearest faithful reading, and these parts are ours:

  * with a built-in character teacher the score is a proxy, not words: 9 × the teacher's
    geometric-mean token probability of the student's completion, floored to an integer 0-9
    (`verbal_proxy`); such a teacher cannot be asked in words. A pretrained teacher is asked
    (`verbal_scorer`): the prompt, the student's answer and a request for one digit 0-9
    (`SCORE_REQUEST`, our wording), its greedy reply's first digit the score, 0 when it gives
    none (an unreadable verdict rejects the trajectory);
  * a rejected trajectory is replaced whole by a teacher sample of the same prompt (the paper's
    later version replaces suffixes);
  * replaced rows enter GRPO as ordinary rollouts: their old logprobs are the student's on the
    teacher's tokens (one forward pass), their importance weight 1 (sampling logprob = old).

    result = run(config, params, teacher_config, teacher_params, source, optim, loop, sampling,
                 threshold=5)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import data, rollouts, sampler, train
from jaxpost import shaping as shaping_lib
from jaxpost.lora import LoraConfig
from jaxpost.models import ModelConfig
from jaxpost.on_policy import run_on_policy
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig, RunResult

MAX_SCORE = 9
SCORE_REQUEST = ("\n\nHow good is the answer above? Reply with one digit, from 0 (wrong) to 9 "
                 "(certainly right).\nScore: ")  # fmt: skip
Scorer = Callable[[list[int], list[list[int]]], np.ndarray]  # (problems, completions) -> [N]


def verbal_proxy(teacher_logp_NxM, mask_NxM) -> np.ndarray:
    """The teacher's 0-9 score of each completion: floor(9 · exp(mean token logprob)), so a
    completion the teacher would write itself token by token scores 9, one it finds unlikely 0."""
    lp = np.asarray(teacher_logp_NxM, np.float64)
    m = np.asarray(mask_NxM, np.float64)
    mean = (lp * m).sum(1) / np.maximum(m.sum(1), 1)
    return np.clip(np.floor(MAX_SCORE * np.exp(mean) + 1e-9), 0, MAX_SCORE).astype(np.int32)


def parse_score(reply: str) -> int:
    """The first digit of the teacher's reply, 0 when there is none."""
    return next((int(ch) for ch in reply if ch in "0123456789"), 0)


def verbal_scorer(teacher_config, teacher_params, tokenizer, prompt_text: Callable[[int], str],
                  *, max_new_tokens: int = 4) -> Scorer:  # fmt: skip
    """A `Scorer` that asks a pretrained teacher in words: for each row, the text of its prompt
    (`prompt_text(problem)`), the student's completion decoded (without its stop token), then
    `SCORE_REQUEST`; the greedy reply's first digit (`parse_score`). `tokenizer` reads and
    writes the teacher's text (the completion's ids are in the same vocabulary: OVD replaces
    rows with teacher samples)."""

    def score(problems: list[int], completions: list[list[int]]) -> np.ndarray:
        texts = [prompt_text(i) + tokenizer.decode([t for t in c if t != tokenizer.eos_id])
                 + SCORE_REQUEST for i, c in zip(problems, completions)]  # fmt: skip
        prompts = [tokenizer.encode(t, add_bos=True) for t in texts]
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > teacher_config.max_seq_len:
            raise ValueError(f"OVD's scoring prompt needs {longest} tokens, more than the "
                             f"teacher's max_seq_len {teacher_config.max_seq_len}")  # fmt: skip
        out = sampler.generate(teacher_config, teacher_params, prompts, temperature=0.0,
                               max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, seed=0)  # fmt: skip
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return np.asarray([parse_score(tokenizer.decode(tokens[r, : lengths[r]].tolist()))
                           for r in range(len(prompts))], np.int32)  # fmt: skip

    return score


def replace_rows(student: rollouts.StepRollouts, teacher: rollouts.StepRollouts, rows,
                 student_logp_NxM) -> rollouts.StepRollouts:  # fmt: skip
    """The student's rollouts with `rows` (bool [N]) taken from the teacher's rollouts of the
    same prompts: completion, mask, entropy; their old and sampling logprobs the student's own on
    the teacher's tokens (`student_logp_NxM`, computed for every row)."""
    rows = np.asarray(rows, bool)
    if student.problems != teacher.problems:
        raise ValueError("the teacher's rollouts must be of the student's prompts, row by row")
    s, t = student.batch, teacher.batch

    def pick(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return np.where(rows.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)

    new_logp = np.asarray(student_logp_NxM, np.float32) * np.asarray(t.completion_mask)
    batch = s.replace(completion=pick(s.completion, t.completion),
                      completion_mask=pick(s.completion_mask, t.completion_mask),
                      old_logp=pick(s.old_logp, new_logp),
                      sampling_logp=pick(s.sampling_logp, new_logp))  # fmt: skip
    completions = [teacher.completions[i] if rows[i] else c
                   for i, c in enumerate(student.completions)]  # fmt: skip
    return rollouts.StepRollouts(batch, list(student.problems), completions,
                                 pick(student.entropy, teacher.entropy), student.rows)  # fmt: skip


def run(config: ModelConfig, params, teacher_config: ModelConfig, teacher_params,
        source: PromptSource, optim: train.OptimConfig, loop: LoopConfig,
        sampling: SamplingConfig, *, threshold: int = 5, scorer: Scorer | None = None,
        mesh=None, loss_impl: str = "auto", lora: LoraConfig | None = None,
        **loss_kwargs) -> RunResult:  # fmt: skip
    """OVD: each step's student rollouts scored by the teacher (`scorer`, e.g. `verbal_scorer`;
    default `verbal_proxy` of the teacher's logprobs), those under
    `threshold` replaced by teacher samples of the same prompts, then GRPO's group advantages
    of the verifier's reward and its clipped loss (`loss_kwargs` as for `loops.run_grpo`).
    Metrics: `ovd_score` (mean teacher score of the student's rollouts), `ovd_replaced_frac`,
    `reward` (of the student's own rollouts, before replacement). One process."""
    if not 0 <= threshold <= MAX_SCORE + 1:
        raise ValueError(f"the OVD threshold must lie in [0, {MAX_SCORE + 1}], got {threshold}")
    if teacher_config.vocab_size != config.vocab_size:
        raise ValueError("OVD's teacher writes demonstrations in the student's tokens: the "
                         "vocabularies must match")  # fmt: skip
    if source.reward is None or jax.process_count() > 1:
        raise ValueError("OVD needs a reward function and runs in one process")
    student_lp = train.jitted_completion_logprobs(config, loss_impl)
    teacher_lp = train.jitted_completion_logprobs(teacher_config, loss_impl)
    kw = dict(batch_size=loop.batch_size, seed=loop.seed, mesh=mesh)

    def on_device(b: data.CompletionBatch) -> data.CompletionBatch:
        return jax.tree.map(jnp.asarray, b)

    def collect(params, step):
        r = rollouts.sample_step(config, params, source, sampling, step=step, **kw)
        own = rollouts.rewards(source, r)
        if scorer is not None:
            scores = np.asarray(scorer(r.problems, r.completions))
        else:
            scores = verbal_proxy(teacher_lp(teacher_params, on_device(r.batch)),
                                  r.batch.completion_mask)  # fmt: skip
        low = scores < threshold
        r.rewards = own
        if low.any():
            t = rollouts.sample_step(teacher_config, teacher_params, source, sampling, step=step,
                                     **kw)  # fmt: skip
            lp = np.asarray(student_lp(params, on_device(t.batch)))
            r = replace_rows(r, t, low, lp)
            r.rewards = np.where(low, rollouts.rewards(source, t), own).astype(np.float32)
        return r, {"ovd_score": float(scores.mean()), "ovd_replaced_frac": float(low.mean()),
                   "reward": float(own.mean())}  # fmt: skip

    def score(r: rollouts.StepRollouts):
        return shaping_lib.grpo_batch(source, r, sampling, shaping_lib.Shaping())

    objective = train.grpo_objective(config, loss_impl=loss_impl, **loss_kwargs)
    return run_on_policy(config, params, source, objective, score, optim, loop, sampling,
                         mesh=mesh, collect=collect, lora=lora)  # fmt: skip
