"""Spectrum Tuning: SFT on a task description followed by several samples of its distribution.

Spectrum Tuning (Sorensen et al., 2510.06084; code tsor13/spectrum) fine-tunes on sequences
"description, output_1, output_2, ..., output_k" whose outputs are independent samples of the
target distribution, with the loss on the outputs only. The model learns to
*be* the distribution: its first output is a sample of it, and outputs given in context steer
the next one (in-context steerability).

On a verifiable task the target is uniform over the full solution set. Ours, not the paper's
format: each output ends with the eos token, so a model asked for one answer stops after the
first output and every model is evaluated alike; the description is the task's own prompt.

    examples = spectrum_examples(tokenizer, task, problems, outputs=4, per_problem=4, seed=0)
    prompt = in_context_prompt(tokenizer, task.render_prompt(p), [completion_a, completion_b])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxpost.tokenizers import Tokenizer


def spectrum_examples(tokenizer: Tokenizer, task, problems: Sequence, *, outputs: int,
                      per_problem: int, seed: int) -> list[tuple[list[int], list[int]]]:  # fmt: skip
    """(prompt ids, completion ids) per sequence: the prompt (bos first), then `outputs`
    independent draws from the uniform distribution over the full solution set (i.i.d. samples
    of the target, so repeats happen on small sets), each rendered as the task's completion and
    closed by eos. `per_problem` sequences per problem, deterministic in `seed`."""
    if outputs < 1 or per_problem < 1:
        raise ValueError(f"outputs and per_problem must be >= 1, got {outputs}, {per_problem}")
    rng = np.random.default_rng([seed, 31])
    out = []
    for p in problems:
        sols = task.solutions(p)
        prompt = tokenizer.encode(task.render_prompt(p), add_bos=True)
        for _ in range(per_problem):
            chosen = rng.integers(0, len(sols), size=outputs)
            completion = []
            for i in chosen:
                completion += tokenizer.encode(task.render_completion(p, sols[int(i)]),
                                               add_eos=True)  # fmt: skip
            out.append((prompt, completion))
    return out


def in_context_prompt(tokenizer: Tokenizer, description: str, outputs: Sequence[str]) -> list[int]:
    """bos, the description, then each output closed by eos: the prompt whose next output the
    in-context examples should steer."""
    ids = tokenizer.encode(description, add_bos=True)
    for text in outputs:
        ids += tokenizer.encode(text, add_eos=True)
    return ids


def steer_contexts(steer, problems: Sequence, *, examples: int, seed: int) -> list[list[str]]:
    """For each steering problem, `examples` completions of its compliant solutions (drawn with
    replacement), each opening with the requested operation: the in-context view of the
    instruction "first <op>" without the instruction."""
    rng = np.random.default_rng([seed, 37])
    out = []
    for p in problems:
        sols = steer.compliant_solutions(p)
        picks = rng.integers(0, len(sols), size=examples)
        out.append([steer.render_completion(p, sols[int(i)]) for i in picks])
    return out
