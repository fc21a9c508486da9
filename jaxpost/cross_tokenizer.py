"""Distillation across tokenizers: a top-k teacher's scores moved into the student's vocabulary.

The student samples a completion in its own tokens; the teacher scores the same completion *text*
in its tokens. Two things then differ: where the positions are, and what the ids mean. This
module is host-side numpy, run once per batch between sampling and the jitted step.

Positions are aligned on text. Position j of a completion holds the distribution of token j
given the text before it, so a student position and a teacher position compare the same event
when their tokens start at the same character offset of the same text (`char_offsets`,
`align_positions`). A student position with no such teacher position gets no loss (`aligned`).
eos has no text; the student's eos position is aligned with the teacher's eos position
explicitly, and only when the two texts are equal.

Ids are mapped through first characters, in the spirit of cross-tokenizer logit distillation
(GOLD-style vocabulary projection); the design and code here are ours. Each teacher token t
reads as a string s(t); `first_token_map` sends t to f(t), the student's first token of s(t).
The student-space teacher distribution is the push-forward

    p_T(next student token = s) ≈ Σ_{t : f(t) = s} p_T(t)

(`project_topk`). It is exact when the student is a character tokenizer (the marginal of the next
character, and eos maps to eos). For a subword student it is an approximation: a teacher token
"1" followed by "2" is credited to the student's "1", never to its "12". Teacher tokens with no
student image (special tokens, pieces of a character, text the student cannot encode) and the
teacher's own tail join the student-space tail. The teacher's tail mass stays in the tail even
when it would map onto a kept student id (exact only when the teacher's top-k holds its whole
distribution). The completion is re-encoded on its own, apart from the prompt: right for byte-level
and character tokenizers, not for a SentencePiece teacher that prefixes a text with a space.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

import kernels
from jaxpost import data
from jaxpost.tokenizers import Tokenizer

# Longest run of tokens one character may be split over (4 UTF-8 bytes, with room to spare).
MAX_CHARACTER_RUN = 8
REPLACEMENT = "\ufffd"  # what a decoder writes for the bytes of an unfinished character
ANCHORS = ("a", "0", "x")  # text decoded before a token, so it reads as it does mid-text


def _anchor(tok: Tokenizer) -> tuple[list[int], str]:
    """(ids, text) of a short text that round-trips through `tok`, or ([], "") when none does."""
    for text in ANCHORS:
        try:
            ids = tok.encode(text)
        except ValueError:
            continue
        if ids and tok.decode(ids, stop_at_eos=False) == text:
            return ids, text
    return [], ""


def _after(tok: Tokenizer, anchor: tuple[list[int], str], ids: list[int]) -> str | None:
    """The text `ids` add after the anchor; None if it holds part of a character."""
    head, head_text = anchor
    text = tok.decode(head + ids, stop_at_eos=False)
    if not text.startswith(head_text) or REPLACEMENT in text[len(head_text) :]:
        return None
    return text[len(head_text) :]


@functools.lru_cache(maxsize=8)
def _pieces(tok: Tokenizer) -> tuple[str | None, ...]:
    """Each token's text as it reads mid-text ("" for special tokens, None for a piece of a
    character). Decoding after an anchor keeps a leading space that a decoder drops at the start
    of a text (SentencePiece's "▁")."""
    anchor = _anchor(tok)
    return tuple(_after(tok, anchor, [t]) for t in range(tok.vocab_size))


def _offsets_by_pieces(tok: Tokenizer, ids: list[int], text: str) -> np.ndarray | None:
    """Offsets from each token's own text: linear in the length. None when the pieces do not
    add up to `text` (a decoder whose output depends on more context), or a character is split
    over more than MAX_CHARACTER_RUN tokens."""
    pieces, anchor = _pieces(tok), None
    out, parts, at, j = np.empty(len(ids) + 1, np.int64), [], 0, 0
    while j < len(ids):
        piece = pieces[ids[j]] if 0 <= ids[j] < len(pieces) else ""
        end = j + 1
        while piece is None and end < min(len(ids), j + MAX_CHARACTER_RUN):
            anchor = anchor or _anchor(tok)  # the tokens j..end read as one span
            end += 1
            piece = _after(tok, anchor, ids[j:end])
        if piece is None:
            return None
        out[j:end] = at
        parts.append(piece)
        at, j = at + len(piece), end
    out[-1] = len(text)
    return out if "".join(parts) == text else None


def _offsets_by_prefixes(tok: Tokenizer, ids: list[int], text: str) -> np.ndarray:
    """Offsets from decoding every prefix: right for any decoder, quadratic in the length.
    A prefix that is not a prefix of `text` ends inside a character: its next token continues
    the previous token's span (same start)."""
    out = np.zeros(len(ids) + 1, np.int64)
    for j in range(1, len(ids)):
        prefix = tok.decode(ids[:j], stop_at_eos=False)
        clean = text.startswith(prefix) and len(prefix) >= out[j - 1]
        out[j] = len(prefix) if clean else out[j - 1]
    out[len(ids)] = len(text)
    return out


def _offsets_and_text(tok: Tokenizer, ids: Iterable[int]) -> tuple[np.ndarray, str]:
    ids = [int(i) for i in ids]
    text = tok.decode(ids, stop_at_eos=False)
    offsets = _offsets_by_pieces(tok, ids, text)
    return (_offsets_by_prefixes(tok, ids, text) if offsets is None else offsets), text


def char_offsets(tok: Tokenizer, ids: Iterable[int]) -> np.ndarray:
    """int64 ``[L + 1]`` character boundaries of `ids` in their decoded text (special tokens
    kept, eos not stopping): token j starts at ``o[j]`` and ``o[L]`` is the text's length.

    Offsets never decrease. A token that starts inside a character (byte-level BPE splits one
    over several tokens) continues the previous token's span: it repeats that start, so only the
    first token of a run of equal starts begins at a clean text boundary. Special tokens (eos,
    pad) have no text: at the end they start at the text's end.
    """
    return _offsets_and_text(tok, ids)[0]


def align_positions(student_offsets, teacher_offsets, *, limit: int | None = None) -> np.ndarray:
    """int64 ``[L_s]``: for each student position j, the teacher position whose token starts at
    the same character offset, else −1; both arguments are `char_offsets` boundaries.

    Only the first position of a run of equal starts is a clean start (`char_offsets`), on
    either side; the others get −1 and are never matched. `limit`: match only starts ≤ limit
    (the length of the texts' common prefix, where the two texts agree).
    """
    s = np.asarray(student_offsets, np.int64)[:-1]
    t = np.asarray(teacher_offsets, np.int64)[:-1]
    if np.any(np.diff(s) < 0) or np.any(np.diff(t) < 0):
        raise ValueError("character offsets must never decrease (use char_offsets)")
    if len(s) == 0 or len(t) == 0:
        return np.full(len(s), -1, np.int64)
    s_first = np.r_[True, s[1:] != s[:-1]]
    t_first = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])
    starts = t[t_first]  # strictly increasing
    k = np.minimum(np.searchsorted(starts, s), len(starts) - 1)
    hit = s_first & (starts[k] == s) & (True if limit is None else s <= limit)
    return np.where(hit, t_first[k], -1).astype(np.int64)


def first_token_map(teacher_tok: Tokenizer, student_tok: Tokenizer, *,
                    map_eos: bool = True) -> np.ndarray:  # fmt: skip
    """int32 ``[V_teacher]``: each teacher token's student image, the first student token of the
    teacher token's text (as it reads mid-text); −1 for special tokens, empty text, pieces of a
    character, and text the student cannot encode or encodes to a special token. `map_eos`
    sends the teacher's eos to the student's: both mean "the completion ends here"."""
    student_pieces = _pieces(student_tok)
    out = np.full(teacher_tok.vocab_size, -1, np.int32)
    for t, text in enumerate(_pieces(teacher_tok)):
        if not text:
            continue
        try:
            ids = student_tok.encode(text)
        except ValueError:  # outside a character vocabulary
            continue
        if ids and 0 <= ids[0] < len(student_pieces) and student_pieces[ids[0]] != "":
            out[t] = ids[0]
    if map_eos:
        out[teacher_tok.eos_id] = student_tok.eos_id
    return out


def project_topk(idx, logp, log_tail, vocab_map, student_vocab: int, *,
                 slots: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """A teacher's top-k ``[..., k]`` (ids, log-probabilities, log tail ``[...]``) in the
    student's vocabulary: int32 ids ``[..., slots]``, float32 logp ``[..., slots]`` and log tail.

    Teacher ids with the same image ``vocab_map[t] = s`` merge into one slot (log Σ exp of their
    logp); ids with no image (−1, outside the map or the student's vocabulary) join the tail,
    ``log_tail_s = logaddexp(log_tail, log Σ their p)``. Merged ids come first, most likely first;
    the slots left over hold distinct student ids found nowhere else in the row, with logp −inf
    (a consumer folds the student's mass there into its tail). If more distinct ids than `slots`
    remain, the least likely join the tail. Buckets still sum to one. `slots` lies in
    [1, min(k, student_vocab)] (the filler ids must be distinct) and defaults to its top.
    """
    idx, logp = np.asarray(idx), np.asarray(logp, np.float64)
    log_tail, vocab_map = np.asarray(log_tail, np.float64), np.asarray(vocab_map)
    if idx.shape != logp.shape or idx.ndim < 1 or log_tail.shape != idx.shape[:-1]:
        raise ValueError(f"need idx, logp [..., k] and log_tail [...]; got {idx.shape}, "
                         f"{logp.shape}, {log_tail.shape}")  # fmt: skip
    lead, k = idx.shape[:-1], idx.shape[-1]
    slots = min(k, student_vocab) if slots is None else slots
    if not 1 <= slots <= min(k, student_vocab):
        raise ValueError(f"slots must lie in [1, min(k = {k}, student_vocab = {student_vocab})], "
                         f"got {slots}")  # fmt: skip
    rows, lp = idx.reshape(-1, k), logp.reshape(-1, k)
    n = rows.shape[0]
    inside = (rows >= 0) & (rows < len(vocab_map))
    image = np.where(inside, vocab_map[np.clip(rows, 0, len(vocab_map) - 1)], -1)
    # group equal images: sort them, a group starts where the image changes; no image sorts last
    key = np.where((image >= 0) & (image < student_vocab), image, student_vocab)
    order = np.argsort(key, axis=1, kind="stable")
    key, lp = np.take_along_axis(key, order, 1), np.take_along_axis(lp, order, 1)
    group = np.cumsum(np.c_[np.ones((n, 1), bool), key[:, 1:] != key[:, :-1]], axis=1) - 1
    top = lp.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)  # shift by the row's max: no overflow, no NaN
    flat = (group + k * np.arange(n)[:, None]).ravel()
    mass = np.bincount(flat, weights=np.exp(lp - top).ravel(), minlength=n * k).reshape(n, k)
    ids = np.full((n, k), -1, np.int64)
    np.put_along_axis(ids, group, key, axis=1)
    with np.errstate(divide="ignore"):
        merged = top + np.log(mass)
    real = (ids >= 0) & (ids < student_vocab)
    lost = np.where(ids == student_vocab, merged, -np.inf).max(axis=1)
    # most likely first; ties (a real id at −inf) keep group order, which puts real ids before
    # the no-image group (its key sorts last) and the empty groups (after every group)
    order = np.argsort(np.where(real, -merged, np.inf), axis=1, kind="stable")
    ids, merged = np.take_along_axis(ids, order, 1), np.take_along_axis(merged, order, 1)
    real = np.take_along_axis(real, order, 1)
    if slots < k:  # the least likely merged ids beyond the slots join the tail
        extra = np.where(real[:, slots:], merged[:, slots:], -np.inf)
        lost = np.logaddexp(lost, _logsumexp(extra))
        ids, merged, real = ids[:, :slots], merged[:, :slots], real[:, :slots]
    # fillers: the smallest ids absent from the row; among min(2·slots, V) there are enough
    width = min(2 * slots, student_vocab)
    present = np.zeros((n, width + 1), bool)
    np.put_along_axis(present, np.where(real & (ids < width), ids, width), True, axis=1)
    free = np.argsort(present[:, :width], axis=1, kind="stable")[:, :slots]
    count = real.sum(axis=1, keepdims=True)
    filler = np.take_along_axis(free, np.clip(np.arange(slots) - count, 0, slots - 1), 1)
    idx_s = np.where(real, ids, filler).astype(np.int32).reshape(*lead, slots)
    logp_s = np.where(real, merged, -np.inf).astype(np.float32).reshape(*lead, slots)
    tail_s = np.logaddexp(log_tail.reshape(-1), lost).astype(np.float32).reshape(lead)
    return idx_s, logp_s, tail_s


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def completion_rows(completion, completion_mask) -> list[list[int]]:
    """Each row's real completion ids (mask > 0): what `teacher_completions` reads."""
    completion, mask = np.asarray(completion), np.asarray(completion_mask)
    return [completion[r][mask[r] > 0].tolist() for r in range(completion.shape[0])]


def teacher_completions(student_tok: Tokenizer, teacher_tok: Tokenizer,
                        rows: Iterable[Sequence[int]]) -> list[list[int]]:  # fmt: skip
    """The teacher's tokenization of each student completion (real ids, cut after the first
    eos): its text re-encoded, plus the teacher's eos when the student's ended with eos. A
    teacher that cannot encode the whole text (`covers`) gets its longest prefix it can, and no
    eos; alignment stops where the texts part."""
    out = []
    for row in rows:
        row = [int(i) for i in row]
        ended = student_tok.eos_id in row
        text = student_tok.decode(row[: row.index(student_tok.eos_id)] if ended else row)
        covers = getattr(teacher_tok, "covers", None)
        if covers is not None and not covers(text):
            text = text[: next(i for i, c in enumerate(text) if not covers(c))]
            ended = False
        out.append(teacher_tok.encode(text) + ([teacher_tok.eos_id] if ended else []))
    return out


def pad_rows(rows: Sequence[Sequence[int]], width: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(int32 ids ``[N, width]``, int32 mask) of right-padded rows; longer rows are cut."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        row = list(row)[:width]
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
    return ids, mask


def _row_alignment(student_tok: Tokenizer, teacher_tok: Tokenizer, s_ids: list[int],
                   t_ids: list[int]) -> np.ndarray:  # fmt: skip
    """``[len(s_ids)]`` teacher position of each student position, or −1."""
    s_off, s_text = _offsets_and_text(student_tok, s_ids)
    t_off, t_text = _offsets_and_text(teacher_tok, t_ids)
    same = len(os.path.commonprefix([s_text, t_text]))
    pos = align_positions(s_off, t_off, limit=same)
    s_eos = [j for j, i in enumerate(s_ids) if i == student_tok.eos_id]
    t_eos = [j for j, i in enumerate(t_ids) if i == teacher_tok.eos_id]
    pos[s_eos] = -1  # eos pairs with eos only, never with a token that starts at the text's end
    pos[np.isin(pos, t_eos)] = -1
    if s_eos and t_eos and s_text == t_text:
        pos[s_eos[0]] = t_eos[0]
    return pos


def cross_tokenizer_topk(student_tok: Tokenizer, teacher_tok: Tokenizer, vocab_map,
                         completion, completion_mask, teacher_completion,
                         teacher_completion_mask, teacher_topk: kernels.TopK, *,
                         student_vocab: int | None = None) -> tuple[kernels.TopK, np.ndarray]:  # fmt: skip
    """The teacher's top-k of a batch in the student's positions and vocabulary.

    Args:
      completion, completion_mask: [N, M] the student's completions (mask 1 on real tokens).
      teacher_completion, teacher_completion_mask: [N, M_t] the same completions in the
        teacher's tokens (`teacher_completions`, `pad_rows`), which `teacher_topk` scored.
      teacher_topk: `kernels.TopK` [N, M_t, k] in the teacher's vocabulary.
      vocab_map: `first_token_map(teacher_tok, student_tok)`.
      student_vocab: the student model's vocabulary (default the tokenizer's).
    Returns:
      (`kernels.TopK` of numpy arrays [N, M, slots] (`project_topk`), aligned float32 [N, M]):
      1 where a real student position has its teacher position. Unaligned positions hold ids
      0..slots−1 with logp −inf and all the mass in the tail.
    """
    completion, mask = np.asarray(completion), np.asarray(completion_mask)
    t_completion, t_mask = np.asarray(teacher_completion), np.asarray(teacher_completion_mask)
    t_idx, t_logp, t_tail = (np.asarray(x) for x in teacher_topk)
    n, m = completion.shape
    if t_idx.shape[:2] != t_completion.shape or t_completion.shape[0] != n:
        raise ValueError(f"teacher_topk {t_idx.shape} must score teacher_completion "
                         f"{t_completion.shape}, of the student's {n} rows")  # fmt: skip
    pos = np.full((n, m), -1, np.int64)
    for r in range(n):
        s_at, t_at = np.flatnonzero(mask[r] > 0), np.flatnonzero(t_mask[r] > 0)
        p = _row_alignment(student_tok, teacher_tok, completion[r, s_at].tolist(),
                           t_completion[r, t_at].tolist())  # fmt: skip
        pos[r, s_at[p >= 0]] = t_at[p[p >= 0]]
    aligned = pos >= 0
    rows, at = np.arange(n)[:, None], np.maximum(pos, 0)
    vocab = student_tok.vocab_size if student_vocab is None else student_vocab
    idx_s, logp_s, tail_s = project_topk(t_idx[rows, at], t_logp[rows, at], t_tail[rows, at],
                                         vocab_map, vocab)  # fmt: skip
    slots = idx_s.shape[-1]
    idx_s = np.where(aligned[..., None], idx_s, np.arange(slots, dtype=np.int32))
    logp_s = np.where(aligned[..., None], logp_s, np.float32(-np.inf))
    tail_s = np.where(aligned, tail_s, np.float32(0.0))
    return kernels.TopK(idx_s, logp_s, tail_s), aligned.astype(np.float32)


class Translator:
    """A student and a teacher tokenizer with the vocabulary map between them, built once.

    `teacher_batch` re-tokenizes a step's completions for the teacher; `to_student` moves the
    teacher's scores of that batch back to the student's positions and vocabulary.
    """

    def __init__(self, student_tok: Tokenizer, teacher_tok: Tokenizer) -> None:
        self.student, self.teacher = student_tok, teacher_tok
        self.vocab_map = first_token_map(teacher_tok, student_tok)

    def teacher_batch(self, batch: data.CompletionBatch) -> data.CompletionBatch:
        """The batch the teacher scores: its prompt view (which must already be in its tokens)
        and the completions re-tokenized, right-padded to a multiple of the student's width M
        (a few shapes in a run, one compile each)."""
        if batch.teacher_prompt_tokens is None:
            raise ValueError("a teacher with another tokenizer needs its own prompt tokens "
                             "(batch.teacher_prompt_tokens)")  # fmt: skip
        rows = teacher_completions(self.student, self.teacher,
                                   completion_rows(batch.completion, batch.completion_mask))  # fmt: skip
        m = batch.completion.shape[1]
        width = m * max(1, math.ceil(max(map(len, rows), default=0) / m))
        ids, mask = pad_rows(rows, width, self.teacher.pad_id)
        return data.CompletionBatch(
            prompt_tokens=batch.teacher_prompt_tokens, prompt_mask=batch.teacher_prompt_mask,
            completion=ids, completion_mask=mask.astype(np.asarray(batch.completion_mask).dtype),
            teacher_prompt_tokens=batch.teacher_prompt_tokens,
            teacher_prompt_mask=batch.teacher_prompt_mask)  # fmt: skip

    def to_student(self, batch: data.CompletionBatch, teacher_batch: data.CompletionBatch,
                   top: kernels.TopK) -> tuple[kernels.TopK, np.ndarray]:  # fmt: skip
        """(TopK [N, M, slots] in the student's vocabulary, aligned [N, M]) of the teacher's
        `top` on `teacher_batch` (`cross_tokenizer_topk`)."""
        return cross_tokenizer_topk(self.student, self.teacher, self.vocab_map, batch.completion,
                                    batch.completion_mask, teacher_batch.completion,
                                    teacher_batch.completion_mask, top)  # fmt: skip


__all__ = ["Translator", "align_positions", "char_offsets", "completion_rows",
           "cross_tokenizer_topk", "first_token_map", "pad_rows", "project_topk",
           "teacher_completions"]  # fmt: skip
