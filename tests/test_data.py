"""Batching and padding of prompt/completion pairs; local JSONL."""

import numpy as np
import pytest

from jaxpost import data
from jaxpost.tasks import countdown as cd
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()


def test_sft_batch_layout():
    encoded = data.encode_pairs(TOK, [("1 2 -> 3:", "1+2=3;1+2"), ("ab", "c")])
    assert encoded[0][0][0] == TOK.bos_id and encoded[0][1][-1] == TOK.eos_id
    batch = data.sft_batch(encoded, TOK.pad_id, pad_multiple=8)
    tokens, attn, loss = batch.tokens, batch.attention_mask, batch.loss_mask
    assert tokens.shape == (2, 24) and tokens.dtype == np.int32
    p, c = encoded[0]
    np.testing.assert_array_equal(tokens[0, : len(p) + len(c)], p + c)
    assert attn[0].sum() == len(p) + len(c) and (tokens[attn == 0] == TOK.pad_id).all()
    np.testing.assert_array_equal(np.nonzero(loss[0])[0], np.arange(len(p), len(p) + len(c)))
    assert TOK.decode(tokens[1][loss[1] == 1]) == "c"
    assert data.sft_batch(encoded, 0, length=30).tokens.shape == (2, 30)
    with pytest.raises(ValueError, match="more than the width"):
        data.sft_batch(encoded, 0, length=5)


def test_pack_plan_trains_every_example_once_per_epoch_in_rows_that_fit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, 50).tolist()
    plan = data.pack_plan(lengths, rows=4, width=24, seed=5, steps=30)
    assert plan == data.pack_plan(lengths, rows=4, width=24, seed=5, steps=30)  # a function
    stream = [i for e in range(6) for i in np.random.default_rng([5, e]).permutation(50)]
    at = 0
    for step in plan:  # each step takes the next examples of the epochs' order, in rows that fit
        assert len(step) == 4 and all(sum(lengths[i] for i in row) <= 24 for row in step)
        taken = sorted(i for row in step for i in row)
        assert taken and taken == sorted(stream[at : at + len(taken)])
        at += len(taken)
    assert at > 50  # a full epoch: each example once
    with pytest.raises(ValueError, match="more than the width"):
        data.pack_plan([30], rows=2, width=24, seed=0, steps=1)


def test_packed_sft_batch_marks_segments_and_completions():
    encoded = data.encode_pairs(TOK, [("1 2:", "3"), ("ab", "cd"), ("x", "y")])
    batch = data.packed_sft_batch(encoded, [[0, 2], [1]], TOK.pad_id, width=16)
    (p0, c0), (p1, c1), (p2, c2) = encoded
    n0, n2 = len(p0) + len(c0), len(p2) + len(c2)
    np.testing.assert_array_equal(batch.tokens[0, : n0 + n2], [*p0, *c0, *p2, *c2])
    np.testing.assert_array_equal(batch.attention_mask[0], [1] * n0 + [2] * n2 + [0] * (16 - n0 - n2))
    assert TOK.decode(batch.tokens[0][batch.loss_mask[0] == 1]) == TOK.decode([*c0, *c2])
    assert TOK.decode(batch.tokens[1][batch.loss_mask[1] == 1]) == TOK.decode(c1)
    with pytest.raises(ValueError, match="more than the width"):
        data.packed_sft_batch(encoded, [[0, 1, 2]], TOK.pad_id, width=8)


def test_pair_batch_aligns_completions_across_privileged_views():
    task = cd.Countdown()
    problems = task.prompts("train", 3, seed=0)
    views = [cd.privileged_view(task, p, task.solutions(p)[0]) for p in problems]
    completions = [task.render_completion(p, task.solutions(p)[-1]) for p in problems]
    batch = data.pair_batch(
        [TOK.encode(v.student_prompt, add_bos=True) for v in views],
        [TOK.encode(c, add_eos=True) for c in completions],
        TOK.pad_id,
        teacher_prompts=[TOK.encode(v.teacher_prompt, add_bos=True) for v in views],
    )
    P = batch.prompt_tokens.shape[1]
    assert batch.teacher_prompt_tokens.shape[1] > P and P % 16 == 0
    for i, v in enumerate(views):
        assert batch.prompt_mask[i, -1] == 1 and batch.completion_mask[i, 0] == 1
        assert TOK.decode(batch.prompt_tokens[i]) == v.student_prompt
        assert TOK.decode(batch.teacher_prompt_tokens[i]) == v.teacher_prompt
        assert TOK.decode(batch.completion[i]) == completions[i]
    with pytest.raises(ValueError):
        data.pair_batch([[1]], [[2], [3]], 0)


def test_jsonl_round_trip(tmp_path):
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"x": [1, 2]}]
    path = str(tmp_path / "a.jsonl")
    data.write_jsonl(path, rows)
    assert data.read_jsonl(path) == rows
    with open(path, "a") as f:
        f.write("\n{not json\n")
    with pytest.raises(ValueError, match="a.jsonl:4"):
        data.read_jsonl(path)
