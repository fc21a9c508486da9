"""Evaluation glue: sample n completions per held-out problem, verify them, summarise.

    samples = evaluate.sample(config, params, tokenizer, task, problems, n=64, max_new_tokens=32)
    summary = evaluate.summarize(samples)   # pass@k and CoT-pass@k curves, pass@1, coverage, ...

`Samples` keeps everything later metrics need (the verdicts, canonical solution of every correct
sample, per-token logprobs under the sampling model), so one sampling pass per model serves
pass@k, diversity, solution-set coverage and the likelihood-based metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxpost import data, distributed, metrics, sampler, sharding
from jaxpost.models import ModelConfig
from jaxpost.tokenizers import Tokenizer


@dataclasses.dataclass
class Samples:
    """n samples for each of P problems; arrays are [P, S] unless stated.

    Attributes:
      problems: the P problems.
      prompts: token ids of each prompt as the model saw it.
      texts: [P][S] decoded completions (up to the stop token).
      tokens, mask, logprobs: [P·S, M] completion tokens, validity mask and their per-token
        logprob under the untempered sampling policy (rows of one problem are contiguous).
      seq_logprob: sum of `logprobs` over each completion.
      answer_ok: the final answer verifies. chain_ok: answer and chain verify (CoT-pass@k).
      canonical: [P][S] canonical solution of a correct sample, None otherwise.
      diversity_keys: [P][S] what diversity counts of a correct sample (`task.diversity_key`:
        the canonical solution on Countdown, the reasoning path on GSM8K), None otherwise.
    """

    problems: list
    prompts: list[list[int]]
    texts: list[list[str]]
    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    seq_logprob: np.ndarray
    answer_ok: np.ndarray
    chain_ok: np.ndarray
    canonical: list[list[Any]]
    diversity_keys: list[list[Any]]

    @property
    def n(self) -> int:
        return self.answer_ok.shape[1]


def _problems_per_chunk(problems: int, n: int, max_rows: int) -> int:
    """As few chunks as `max_rows` allows, the problems split evenly between them: 384 x 16
    samples is two chunks of 3072 rows, one program, not 4096 and 2048, two."""
    chunks = -(-problems // max(1, max_rows // n))
    return -(-problems // chunks)


def chunk_rows(problems: int, n: int, mesh=None, max_rows: int = 4096) -> int:
    """The rows `sample` decodes at once for `problems` prompts x `n` samples: every chunk
    (`_problems_per_chunk`) padded to one size, a multiple of 8 and of the data-parallel size
    (one program, the same rows on every device). What a memory plan's `sample_batch` is."""
    multiple = 8 if mesh is None else math.lcm(8, sharding.data_parallel_size(mesh))
    return data.round_up(_problems_per_chunk(problems, n, max_rows) * n, multiple)


def sample(
    config: ModelConfig,
    params,
    tokenizer: Tokenizer,
    task,
    problems: Sequence,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    render: Callable[[Any], str] | None = None,
    encode: Callable[[Any], list[int]] | None = None,
    max_rows: int = 4096,
    mesh=None,
    guide: sampler.Guide | None = None,
) -> Samples:
    """Sample `n` completions per problem and verify each with the task.

    Args:
      render: problem -> prompt text (default `task.render_prompt`; e.g. a steering prompt).
      encode: problem -> prompt token ids instead of `render` (a prompt text cannot spell, e.g.
        in-context outputs closed by eos).
      max_rows: prompts are sampled in chunks of at most this many rows (prompts × n).
      mesh: sample with the rows split over the mesh's data axes. With several processes each
        samples its own rows of every chunk and all processes get every sample back (the
        verdicts and metrics are the same on every host).
      guide: sample Q♯'s value-guided policy (`sampler.Guide`, `jaxpost.qsharp`) instead of the
        model's own; `logprobs` are then the guided policy's.
    """
    if n < 1 or not problems:
        raise ValueError(f"need n >= 1 and at least one problem, got n={n}, {len(problems)} problems")
    render = render or task.render_prompt
    prompts = [encode(p) if encode else tokenizer.encode(render(p), add_bos=True)
               for p in problems]  # fmt: skip
    width = data.round_up(max(len(p) for p in prompts), 16)
    # Every chunk is padded to the rows `chunk_rows` says; filler rows repeat the last prompt.
    per_chunk = _problems_per_chunk(len(prompts), n, max_rows)
    total = chunk_rows(len(prompts), n, mesh, max_rows)
    parts = []
    for start in range(0, len(prompts), per_chunk):
        chunk = prompts[start : start + per_chunk]
        rows = [p for p in chunk for _ in range(n)]
        rows += [rows[-1]] * (total - len(rows))
        mine = distributed.local_rows(mesh, total)
        tokens, mask = data.left_pad(rows[mine], width, tokenizer.pad_id)
        r = sampler.generate_rows(
            config, params, tokens, mask, np.arange(mine.start, mine.stop, dtype=np.int32),
            max_new_tokens=max_new_tokens, temperature=temperature, eos_id=tokenizer.eos_id,
            seed=seed + start, pad_id=tokenizer.pad_id, mesh=mesh, guide=guide,
        )  # fmt: skip
        got = distributed.gather_rows((r.tokens, r.mask, r.logprobs, r.lengths), mine)
        parts.append(tuple(np.asarray(x)[: len(chunk) * n] for x in got))
    tokens, mask, logprobs, lengths = (np.concatenate(x) for x in zip(*parts))
    P = len(problems)
    texts = [[tokenizer.decode(tokens[i * n + s, : lengths[i * n + s]]) for s in range(n)]
             for i in range(P)]  # fmt: skip
    answer_ok = np.array([[task.verify_answer(p, t) for t in row] for p, row in zip(problems, texts)])
    chain_ok = np.array([[bool(a) and task.verify_chain(p, t) for a, t in zip(ok, row)]
                         for p, ok, row in zip(problems, answer_ok, texts)])  # fmt: skip
    canonical = [[task.canonical(p, t) if a else None for a, t in zip(ok, row)]
                 for p, ok, row in zip(problems, answer_ok, texts)]  # fmt: skip
    keys = [[task.diversity_key(p, t) if a else None for a, t in zip(ok, row)]
            for p, ok, row in zip(problems, answer_ok, texts)]  # fmt: skip
    seq = (logprobs * mask).sum(1).reshape(P, n)
    return Samples(list(problems), prompts, texts, tokens, mask, logprobs, seq, answer_ok,
                   chain_ok, canonical, keys)  # fmt: skip


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


def summarize(samples: Samples, *, seed: int = 0) -> dict:
    """pass@k and CoT-pass@k curves (k = 1, 2, 4, ..., n) with bootstrap 95% CIs, and scalars:
    pass@1, pass@n, cot_pass@1, coverage, mean distinct correct solutions per problem."""
    ks = ks_for(samples.n)
    curves = {
        "pass@k": metrics.pass_at_k_curve(samples.answer_ok, ks, seed=seed),
        "cot_pass@k": metrics.pass_at_k_curve(samples.chain_ok, ks, seed=seed),
    }

    def point(curve: dict, i: int) -> dict:
        return {"mean": curve["mean"][i], "lo": curve["lo"][i], "hi": curve["hi"][i]}

    distinct = [len({c for c in row if c is not None}) for row in samples.canonical]
    scalars = {
        "pass@1": point(curves["pass@k"], 0),
        f"pass@{samples.n}": point(curves["pass@k"], -1),
        "cot_pass@1": point(curves["cot_pass@k"], 0),
        "coverage": {"mean": metrics.coverage(samples.answer_ok.sum(1))},
        "distinct_correct": dataclasses.asdict(metrics.mean_ci(np.asarray(distinct, float),
                                                               seed=seed)),  # fmt: skip
    }
    return {"curves": curves, "scalars": scalars}


__all__ = ["Samples", "ks_for", "sample", "summarize"]
