"""From text to arrays: tokenizing prompt/completion pairs, padding them, and reading sources.

Prompt and completion are always encoded separately and concatenated, never encoded as one
string: then the completion's tokens are the same whatever precedes them, which is what lets a
teacher with privileged context and a student be compared position by position.

Two batch structs, the inputs of `jaxpost.train`'s steps (pytrees, so they jit and shard):

  SequenceBatch    one right-padded sequence per example (`sft_batch`), or several packed in a
                   row (`packed_sft_batch`: the attention mask holds segment ids):
                   tokens_BxL, attention_mask_BxL, loss_mask_BxL (1 on completion tokens)
  CompletionBatch  prompts left-padded and completions right-padded, so every completion starts
                   at the same column (`pair_batch`, or the on-policy loop's rollouts):
                   prompt_tokens_NxP, prompt_mask_NxP, completion_NxM, completion_mask_NxM, the
                   teacher's privileged prompt view, and what RL adds (old and sampling logprobs,
                   advantages, reference logprobs)

Sources: `read_jsonl` for local files, `tfds_examples` for a prepared TFDS `data_dir` (the tfds
extra; imported lazily, never downloads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from flax import struct

from jaxpost.tokenizers import Tokenizer


@struct.dataclass
class SequenceBatch:
    """SFT input: one right-padded sequence per example (see `sft_batch`).

    tokens_BxL: prompt ++ completion ++ padding; attention_mask_BxL: 1 on real tokens (in a
    packed row, each example's segment id 1, 2, ...); loss_mask_BxL: 1 on the tokens to predict
    (the completion). The loss at slot t predicts tokens[t + 1] from tokens[<= t], so
    objectives shift by one.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    loss_mask: jax.Array

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


@struct.dataclass
class CompletionBatch:
    """On-policy input, padded once: prompts left-padded [N, P], completions right-padded [N, M],
    so completion token j sits in slot P + j of prompt ++ completion in every row (and in the
    teacher's privileged view, whose prompt has its own width Pt).

    Attributes:
      prompt_tokens, prompt_mask: [N, P] the student's prompt (mask 1 on real tokens).
      completion, completion_mask: [N, M] the sampled completion (mask 1 up to and including
        the stop token).
      teacher_prompt_tokens, teacher_prompt_mask: [N, Pt] the teacher's (privileged) view of the
        prompt for OPSD; None: the teacher sees the student's prompt.
      old_logp: [N, M] log π_old(y_t), the untempered policy that sampled the batch (GRPO).
      sampling_logp: [N, M] log-probability under the distribution actually sampled from
        (temperature, top-k, top-p applied): the importance-correction denominator.
      advantages: [N] per sequence or [N, M] per token (GRPO).
      ref_logp: [N, M] a frozen reference policy's logprobs (GRPO's KL penalty).
      teacher_topk: a top-k teacher's view of every completion token (`kernels.TopK`, arrays
        [N, M, k], [N, M, k], [N, M]), scored outside the student's step (`loops.run_opd`'s
        teacher_topk).
      loss_mask: [N, M] the completion tokens the loss counts, a subset of completion_mask
        (GRPO's truncated completions, high-entropy tokens, dynamic sampling's filler groups);
        None: every completion token. The model still sees every completion token.
      demo, demo_mask: [N, M'] a demonstration of the row's prompt, right-padded like the
        completion (GAD's teacher response, `jaxpost.gad`).
      demo_sft: [N] 1 on a step that trains the policy by SFT on `demo` instead of its
        objective (GAD's warm-up), else 0.
    Optional fields are None when unused; a None is an empty pytree, so it costs nothing in a
    jitted step (but a run keeps the same fields set on every step, or the step recompiles).
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    completion: jax.Array
    completion_mask: jax.Array
    teacher_prompt_tokens: jax.Array | None = None
    teacher_prompt_mask: jax.Array | None = None
    old_logp: jax.Array | None = None
    sampling_logp: jax.Array | None = None
    advantages: jax.Array | None = None
    ref_logp: jax.Array | None = None
    teacher_topk: Any = None
    loss_mask: jax.Array | None = None
    demo: jax.Array | None = None
    demo_mask: jax.Array | None = None
    demo_sft: jax.Array | None = None

    @property
    def rows(self) -> int:
        return self.completion.shape[0]

    def trained_mask(self) -> jax.Array:
        """[N, M] the tokens a loss counts: `loss_mask` if set, else the completion mask."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    def teacher_prompt(self) -> tuple[jax.Array, jax.Array]:
        """(tokens, mask) of the prompt the teacher conditions on: its privileged view if set."""
        if self.teacher_prompt_tokens is None:
            return self.prompt_tokens, self.prompt_mask
        return self.teacher_prompt_tokens, self.teacher_prompt_mask


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple (padded widths keep the number of jitted shapes small)."""
    return -(-n // multiple) * multiple


def pair_width(examples, multiple: int = 16) -> int:
    """The run-wide row width of SFT (prompt ids, completion ids) pairs: the longest pair,
    rounded up to `multiple` (what `sft_batch` rows of a run are padded to)."""
    return round_up(max(len(p) + len(c) for p, c in examples), multiple)


def encode_pairs(
    tokenizer: Tokenizer,
    pairs: Iterable[tuple[str, str]],
    *,
    add_bos: bool = True,
    add_eos: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) per pair; bos opens the prompt, eos closes the completion."""
    return [
        (tokenizer.encode(p, add_bos=add_bos), tokenizer.encode(c, add_eos=add_eos))
        for p, c in pairs
    ]


def right_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """tokens_BxW and mask_BxW with each row at the start; raises if a row is longer than W."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the width {width}")
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return tokens, mask


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """tokens_BxW and mask_BxW with each row at the end; raises if a row is longer than W."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        if len(row) > width:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the width {width}")
        tokens[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return tokens, mask


def _width(rows: Sequence[Sequence[int]], width: int | None, multiple: int) -> int:
    # Widths rounded up to a multiple keep the number of distinct jitted shapes small.
    return width if width is not None else round_up(max([1, *(len(r) for r in rows)]), multiple)


def sft_batch(
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    *,
    length: int | None = None,
    pad_multiple: int = 16,
) -> SequenceBatch:
    """Right-padded SFT arrays from (prompt ids, completion ids) pairs.

    tokens[b] = prompt_b ++ completion_b ++ pad; attention_mask is 1 on real tokens; loss_mask is
    1 exactly on completion tokens (completion-only SFT: the loss at position t predicts
    tokens[t] from tokens[<t], so train uses logits[:, :-1] against tokens[:, 1:] and
    loss_mask[:, 1:]). Width `length`, or the longest example rounded up to `pad_multiple`.
    """
    if not encoded:
        raise ValueError("no examples")
    seqs = [list(p) + list(c) for p, c in encoded]
    tokens, attention = right_pad(seqs, _width(seqs, length, pad_multiple), pad_id)
    loss = np.zeros_like(attention)
    for i, (p, c) in enumerate(encoded):
        loss[i, len(p) : len(p) + len(c)] = 1
    return SequenceBatch(tokens=tokens, attention_mask=attention, loss_mask=loss)


def epoch_order(n: int, seed: int):
    """Example indices forever: epoch e is the permutation of range(n) drawn from (seed, e)."""
    epoch = 0
    while True:
        yield from np.random.default_rng([seed, epoch]).permutation(n).tolist()
        epoch += 1


def pack_plan(lengths: Sequence[int], rows: int, width: int, seed: int, steps: int
              ) -> list[list[list[int]]]:  # fmt: skip
    """Which examples each step's `rows` packed rows of `width` slots hold: plan[t][r] is the
    list of example indices of row r at step t + 1.

    Examples come in `epoch_order(len(lengths), seed)`; each is placed in the first row it fits
    (first-fit), and a step ends at the first example that fits no row, which opens the next
    step. Every example is trained once per epoch, the number per step varies a little (on
    the head-to-head's mixture, one-example rows of 64 slots are ~55% real tokens; packed,
    ~78-81%), and the plan is a function of (lengths, rows, width, seed) alone, so a
    resumed run replays the same steps."""
    if max(lengths) > width:
        raise ValueError(f"an example has {max(lengths)} tokens, more than the width {width}")
    order = epoch_order(len(lengths), seed)
    nxt = next(order)
    plan = []
    for _ in range(steps):
        used, placed = [0] * rows, [[] for _ in range(rows)]
        while True:
            n = lengths[nxt]
            row = next((r for r in range(rows) if used[r] + n <= width), None)
            if row is None:
                break
            used[row] += n
            placed[row].append(nxt)
            nxt = next(order)
        plan.append(placed)
    return plan


def packed_sft_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                     rows: Sequence[Sequence[int]], pad_id: int, width: int) -> SequenceBatch:  # fmt: skip
    """An SFT batch whose row r holds the examples `rows[r]` side by side, then padding: the
    attention mask holds each example's segment id (1, 2, ... along the row; 0 on padding), so
    the model gives every example its own positions and attention (`models.apply`), and the
    loss mask is 1 on completion tokens as in `sft_batch`."""
    tokens = np.full((len(rows), width), pad_id, np.int32)
    segments = np.zeros((len(rows), width), np.int32)
    loss = np.zeros((len(rows), width), np.int32)
    for r, indices in enumerate(rows):
        at = 0
        for k, i in enumerate(indices, start=1):
            p, c = examples[i]
            n = len(p) + len(c)
            if at + n > width:
                raise ValueError(f"row {r}'s examples need more than the width {width}")
            tokens[r, at : at + n] = [*p, *c]
            segments[r, at : at + n] = k
            loss[r, at + len(p) : at + n] = 1
            at += n
    return SequenceBatch(tokens=tokens, attention_mask=segments, loss_mask=loss)


def pair_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    *,
    teacher_prompts: Sequence[Sequence[int]] | None = None,
    prompt_width: int | None = None,
    completion_width: int | None = None,
    pad_multiple: int = 16,
) -> CompletionBatch:
    """Prompt / completion arrays for teacher forcing of fixed completions (OPD on a dataset,
    evaluation of logprobs): prompts left-padded, completions right-padded, so completion
    position j is column j of `completion` in every row and in both views of OPSD.

    The teacher view, when given, is padded to its own width (it is longer by the privileged
    context) and shares `completion`.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(completions)} completions")
    p_tokens, p_mask = left_pad(prompts, _width(prompts, prompt_width, pad_multiple), pad_id)
    c_tokens, c_mask = right_pad(
        completions, _width(completions, completion_width, pad_multiple), pad_id
    )
    batch = CompletionBatch(p_tokens, p_mask, c_tokens, c_mask)
    if teacher_prompts is not None:
        if len(teacher_prompts) != len(prompts):
            raise ValueError(f"{len(teacher_prompts)} teacher prompts for {len(prompts)} prompts")
        t_tokens, t_mask = left_pad(
            teacher_prompts, _width(teacher_prompts, None, pad_multiple), pad_id
        )
        batch = batch.replace(teacher_prompt_tokens=t_tokens, teacher_prompt_mask=t_mask)
    return batch


def read_jsonl(path: str) -> list[dict]:
    """One JSON object per non-empty line; a bad line raises ValueError naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
    return rows


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def tfds_examples(name: str, split: str, data_dir: str | None = None) -> list[dict]:
    """All examples of a prepared TFDS dataset as Python dicts (bytes decoded as UTF-8).

    Reads `data_dir` only (download=False): prepare the dataset once where there is network.
    TensorFlow Datasets is imported here, not at module import, so jaxpost works without it.
    """
    os.environ.setdefault("NO_GCE_CHECK", "true")  # no metadata-server probe on import
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("reading TFDS needs the tfds extra: pip install jaxpost[tfds]") from e

    dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)

    def plain(value):
        if isinstance(value, bytes):
            return value.decode("utf-8")
        if isinstance(value, np.ndarray) and value.dtype == object:
            return [plain(v) for v in value.tolist()]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value.item() if isinstance(value, np.generic) else value

    return [plain(example) for example in tfds.as_numpy(dataset)]
