"""Top-k teachers as a service beside the student's step: several teachers, their own devices, a
score cache, a different tokenizer.

`loops.run_opd(..., teacher_topk=TopkTeachers(...))` calls the service once per batch, between
sampling and the student's jitted step; the step then holds no teacher parameters and reads
k + 1 numbers per token (`teachers.topk_opd_objective`). What the service adds to a plain top-k
teacher (`teachers.topk_teacher`):

- **Several teachers** (one per task or data source): `members` lists (config, params) pairs
  and `route(problem index) -> member` sends each row to its teacher; each teacher scores only
  its rows (padded to a power of two, so a run compiles a few shapes per teacher).
- **Its own devices**: `mesh` is the teachers' mesh (e.g. `sharding.make_mesh(..., devices=the
  devices the student does not use)`): the teachers' parameters are sharded over it by the
  logical rules, the rows are split over its data axes, and only the scores (k + 1 numbers a
  token) come back to the host, then to the student's devices with the batch. One process
  (several processes would need the scores exchanged between hosts: not yet).
- **A cache** of scores by content (`cache_rows` > 0): a row's key is (teacher, the teacher's
  prompt tokens, the completion tokens); a row seen before is not scored again. On-policy rollouts
  repeat (identical completions within a group; a step replayed after a restart; several updates
  per batch), and off-policy reuse (the same completions trained on again) reads the cache only.
  Least recently used rows are evicted past `cache_rows`.
- **A different tokenizer** (`tokenizers=(student, teacher)`): the completion's text is
  re-tokenized for the teacher, the teacher's top-k is projected into the student's vocabulary
  and scored positions are aligned on text (`jaxpost.cross_tokenizer`); student positions with
  no teacher position at the same text offset get no loss (the returned `loss_mask`); a
  completion longer in the teacher's tokens than the teacher's context is cut (its end unaligned).
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

import kernels
from jaxpost import data, sharding, teachers
from jaxpost.models import ModelConfig


class ScoreCache:
    """Top-k scores of rows by content, least recently used evicted past `max_rows`. A value is
    (idx [m, k], logp [m, k], log_tail [m]) over the row's m completion tokens."""

    def __init__(self, max_rows: int):
        if max_rows < 1:
            raise ValueError(f"a score cache needs max_rows >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.rows: collections.OrderedDict[bytes, tuple] = collections.OrderedDict()
        self.hits = self.lookups = 0

    @staticmethod
    def key(member: int, prompt_ids: np.ndarray, completion_ids: np.ndarray) -> bytes:
        h = hashlib.sha1(np.asarray([member, len(prompt_ids)], np.int64).tobytes())
        h.update(np.asarray(prompt_ids, np.int64).tobytes())
        h.update(np.asarray(completion_ids, np.int64).tobytes())
        return h.digest()

    def get(self, key: bytes):
        self.lookups += 1
        value = self.rows.get(key)
        if value is not None:
            self.hits += 1
            self.rows.move_to_end(key)
        return value

    def put(self, key: bytes, value: tuple) -> None:
        self.rows[key] = value
        self.rows.move_to_end(key)
        while len(self.rows) > self.max_rows:
            self.rows.popitem(last=False)


def _bucket(n: int, multiple: int) -> int:
    """The padded row count of a teacher's share: the next power of two, a multiple of the
    mesh's data-parallel size."""
    return data.round_up(1 << max(n - 1, 0).bit_length(), multiple)


class TopkTeachers:
    """One or several top-k teachers scoring a step's rows (see the module docstring).

    Args:
      members: (config, params) of each teacher.
      k: ids kept per token.
      temperature: the divergence's temperature (the teacher's logits are divided by it).
      loss_impl: the teachers' path (`train.LOSS_IMPLS`; "fused_linear" never forms [N, M, V]).
      mesh: the teachers' own mesh, or None (the default device).
      route: problem index -> member; None: member 0 for every row.
      cache_rows: > 0 keeps that many rows' scores for reuse.
      tokenizers: (student, teacher) when they differ (`jaxpost.cross_tokenizer`); the source's
        teacher prompts must then be in the teacher's tokenization.
    """

    def __init__(self, members: Sequence[tuple[ModelConfig, object]], k: int, *,
                 temperature: float = 1.0, loss_impl: str = "auto", mesh=None,
                 route: Callable[[int], int] | None = None, cache_rows: int = 0,
                 tokenizers=None):  # fmt: skip
        if not members:
            raise ValueError("TopkTeachers needs at least one teacher")
        vocab = {c.vocab_size for c, _ in members}
        if len(vocab) != 1:
            raise ValueError(f"the teachers' vocabularies differ ({sorted(vocab)}); one service "
                             "holds teachers of one tokenizer")  # fmt: skip
        if not 1 <= k <= min(vocab):
            raise ValueError(f"teacher_topk must lie in [1, V = {min(vocab)}], got {k}")
        if len(members) > 1 and route is None:
            raise ValueError(f"{len(members)} teachers need a route (problem index -> teacher)")
        if mesh is not None and jax.process_count() > 1:
            raise ValueError("a teachers' mesh runs in one process (not across hosts yet)")
        self.k, self.mesh, self.route, self.temperature = k, mesh, route, temperature
        self.vocab_size = vocab.pop()
        self.max_seq_len = min(c.max_seq_len for c, _ in members)
        self.cache = ScoreCache(cache_rows) if cache_rows else None
        self.tokenizers = tokenizers
        self._translate = None
        if tokenizers is not None:
            from jaxpost import cross_tokenizer

            self._translate = cross_tokenizer.Translator(*tokenizers)
        self.params, self.scorers = [], []
        for config, params in members:
            if mesh is not None:
                params = sharding.shard_params(params, sharding.param_shardings(config, mesh))
            self.params.append(params)
            self.scorers.append(jax.jit(teachers.topk_teacher(config, k, loss_impl=loss_impl,
                                                              temperature=temperature)))  # fmt: skip
        self.multiple = 1 if mesh is None else sharding.data_parallel_size(mesh)

    def _score(self, member: int, batch: data.CompletionBatch, rows: list[int]):
        """Teacher `member`'s TopK of `rows` of `batch` (numpy), padded rows dropped."""
        b = _bucket(len(rows), self.multiple)
        sel = np.asarray(rows + [rows[0]] * (b - len(rows)))
        sub = jax.tree.map(lambda x: np.asarray(x)[sel], batch)
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                top = self.scorers[member](self.params[member], sharding.shard_batch(sub, self.mesh))
        else:
            top = self.scorers[member](self.params[member], sub)
        return jax.tree.map(lambda x: np.asarray(x)[: len(rows)], top)

    def __call__(self, batch: data.CompletionBatch, problems: Sequence[int]):
        """(kernels.TopK of numpy arrays [N, M, k] in the student's vocabulary, loss_mask [N, M]
        or None, metrics) for this process's rows of a step."""
        metrics = {}
        teacher_batch = batch
        if self._translate is not None:
            teacher_batch = self._translate.teacher_batch(batch)
            room = self.max_seq_len - teacher_batch.prompt_tokens.shape[1]
            if teacher_batch.completion.shape[1] > room:  # longer in the teacher's tokens: cut
                teacher_batch = teacher_batch.replace(completion=teacher_batch.completion[:, :room],
                                                      completion_mask=teacher_batch.completion_mask[:, :room])  # fmt: skip
        n, m = teacher_batch.completion.shape
        owner = [0 if self.route is None else int(self.route(p)) for p in problems]
        if any(not 0 <= o < len(self.scorers) for o in owner):
            raise ValueError(f"route gave a teacher outside [0, {len(self.scorers)})")
        idx = np.zeros((n, m, self.k), np.int32)
        logp = np.full((n, m, self.k), -np.log(self.k), np.float32)
        tail = np.full((n, m), -np.inf, np.float32)
        idx[...] = np.arange(self.k, dtype=np.int32)
        lengths = np.asarray(teacher_batch.completion_mask).sum(1).astype(int)
        tp, tpm = (np.asarray(x) for x in teacher_batch.teacher_prompt())
        comp = np.asarray(teacher_batch.completion)
        keys, todo = [None] * n, collections.defaultdict(list)
        for r in range(n):
            if self.cache is not None:
                keys[r] = self.cache.key(owner[r], tp[r][tpm[r] > 0], comp[r, : lengths[r]])
                hit = self.cache.get(keys[r])
                if hit is not None:
                    idx[r, : lengths[r]], logp[r, : lengths[r]], tail[r, : lengths[r]] = hit
                    continue
            todo[owner[r]].append(r)
        for member, rows in todo.items():
            top = self._score(member, teacher_batch, rows)
            for j, r in enumerate(rows):
                idx[r], logp[r], tail[r] = top.idx[j], top.logp[j], top.log_tail[j]
                if self.cache is not None:
                    L = lengths[r]
                    self.cache.put(keys[r], (top.idx[j, :L], top.logp[j, :L], top.log_tail[j, :L]))
        if self.cache is not None:
            scored = sum(len(v) for v in todo.values())
            metrics["teacher_cache_hit_frac"] = 1.0 - scored / max(n, 1)
        if len(self.scorers) > 1:
            for t in range(len(self.scorers)):
                metrics[f"teacher_{t}_rows"] = float(sum(o == t for o in owner))
        top = kernels.TopK(idx, logp, tail)
        if self._translate is None:
            return top, None, metrics
        top, aligned = self._translate.to_student(batch, teacher_batch, top)
        metrics["aligned_frac"] = float(aligned.sum() / max(np.asarray(batch.completion_mask).sum(), 1))
        return top, aligned, metrics


__all__ = ["ScoreCache", "TopkTeachers"]
