"""Cross-tokenizer distillation: offsets and alignment on text, the first-token vocabulary map,
and the projection of a top-k teacher, against readings that share no code with the module
(token bytes for byte-level BPE, float64 dense push-forwards, prefix decoding)."""

import numpy as np
import pytest

import kernels
from jaxpost import cross_tokenizer as ct
from jaxpost import data
from jaxpost.tokenizers import CharTokenizer, HFTokenizer

CORPUS = [f"({a} + {b}) * {c} = {(a + b) * c}" for a in range(10) for b in range(10)
          for c in range(3)] + ["héllo € wörld", "3 5 7 -> 22:", "7+(3*5)=22\n"] * 3  # fmt: skip
TEXTS = ["(3 + 4) * 5 = 35", "12+3", " 7 € x", "héllo 9", "", "a\nb  c"]


def _hf(vocab_size, kind="byte_level"):
    """A tiny BPE trained here on task-like text, wrapped as jaxpost's HFTokenizer: no network.
    "byte_level" as GPT-2 / Qwen; "metaspace" as SentencePiece ("▁" for a space)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "byte_level":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder, alphabet = decoders.ByteLevel(), pre_tokenizers.ByteLevel.alphabet()
    else:
        bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet,
                                  special_tokens=["<pad>", "</s>", "<unk>"])  # fmt: skip
    bpe.train_from_iterator(CORPUS, trainer)
    return HFTokenizer(transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"))  # fmt: skip


@pytest.fixture(scope="module")
def bpe():
    return _hf(320)


@pytest.fixture(scope="module")
def bpe_small():  # fewer merges: another tokenization of the same text
    return _hf(275)


@pytest.fixture(scope="module")
def char():
    return CharTokenizer()


def _byte_of_symbol():
    """GPT-2's byte-level alphabet, inverted: the printable symbol of each byte -> the byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols, extra = dict(zip(keep, keep)), 0
    for b in range(256):
        if b not in symbols:
            symbols[b], extra = 256 + extra, extra + 1
    return {chr(s): b for b, s in symbols.items()}


def _token_bytes(tok):
    """Each id's bytes, read from the BPE's own token strings (special tokens: none)."""
    inverse, special = _byte_of_symbol(), set(tok.hf.all_special_ids)
    return [b"" if t in special else bytes(inverse[c] for c in tok.hf.convert_ids_to_tokens(t))
            for t in range(tok.vocab_size)]  # fmt: skip


def _offsets_from_bytes(token_bytes, ids):
    """Brute force: a token starts at a character boundary of the text's bytes, or continues."""
    whole = b"".join(token_bytes[i] for i in ids)
    out, at = [], 0
    for i in ids:
        boundary = at == len(whole) or (whole[at] & 0xC0) != 0x80
        out.append(len(whole[:at].decode()) if boundary or not out else out[-1])
        at += len(token_bytes[i])
    return np.array(out + [len(whole.decode())])


def test_char_offsets_of_the_character_tokenizer(char):
    ids = char.encode("ab c", add_eos=True) + [char.pad_id] * 2
    np.testing.assert_array_equal(ct.char_offsets(char, ids), [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(ct.char_offsets(char, []), [0])


def test_char_offsets_of_byte_level_bpe_match_its_bytes(bpe):
    token_bytes, rng = _token_bytes(bpe), np.random.default_rng(0)
    rows = [bpe.encode(t) + [bpe.eos_id, bpe.pad_id] for t in TEXTS]
    while len(rows) < 40:  # sampled-like sequences, not the tokenizer's own encodings
        ids = rng.integers(0, bpe.vocab_size, rng.integers(1, 30)).tolist()
        try:
            b"".join(token_bytes[i] for i in ids).decode()
        except UnicodeDecodeError:
            continue
        rows.append(ids)
    for ids in rows:
        expect = _offsets_from_bytes(token_bytes, ids)
        np.testing.assert_array_equal(ct.char_offsets(bpe, ids), expect, err_msg=str(ids))
        text = bpe.decode(ids, stop_at_eos=False)
        np.testing.assert_array_equal(ct._offsets_by_prefixes(bpe, ids, text), expect)


def test_a_character_split_over_tokens_is_one_span(bpe):
    euro = bpe.encode("€")
    assert len(euro) == 2, "the test needs '€' split over two byte-level tokens"
    ids = bpe.encode("x") + euro + bpe.encode("y") + [bpe.eos_id]
    np.testing.assert_array_equal(ct.char_offsets(bpe, ids), [0, 1, 1, 2, 3, 3])
    # the second piece does not start at a clean boundary: it is never aligned
    np.testing.assert_array_equal(ct.align_positions([0, 1, 1, 2, 3, 3], [0, 1, 2, 3, 3]),
                                  [0, 1, -1, 2, 3])  # fmt: skip


def test_char_offsets_with_a_context_dependent_decoder():
    """SentencePiece-style "▁" tokens read differently at the start of a text: the offsets fall
    back to prefix decoding and stay right."""
    meta = _hf(200, "metaspace")
    ids = meta.encode("(3 + 4) * 5")
    assert meta.hf.convert_ids_to_tokens(ids[:2]) == ["▁(3", "▁+"]
    offsets = ct.char_offsets(meta, ids + [meta.eos_id])
    text = meta.decode(ids)
    assert text == "(3 + 4) * 5"
    expect = [len(meta.decode(ids[:j])) for j in range(len(ids))] + [len(text)] * 2
    np.testing.assert_array_equal(offsets, expect)
    assert offsets[1] == 2  # "▁+" starts at the space after "(3"


@pytest.mark.parametrize("student, teacher, limit, expect", [
    ([0, 1, 2, 3, 4], [0, 2, 4], None, [0, -1, 1, -1]),        # "12+3": char vs "12", "+3"
    ([0, 1, 2, 3, 4, 4, 4], [0, 2, 4, 4], None, [0, -1, 1, -1, 2, -1]),  # + eos, pads
    ([0, 2, 4], [0, 1, 2, 3, 4], None, [0, 2]),                 # the other way round
    ([0, 1, 2, 3, 4], [0, 0, 2, 4], None, [0, -1, 2, -1]),      # a teacher split character
    ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], 2, [0, 1, 2, -1]),       # texts part after 2 chars
    ([0, 1, 2], [0], None, [-1, -1]),                           # an empty teacher
    ([0], [0, 1], None, []),                                    # an empty student
])  # fmt: skip
def test_align_positions(student, teacher, limit, expect):
    got = ct.align_positions(student, teacher, limit=limit)
    np.testing.assert_array_equal(got, expect)


def test_align_positions_rejects_decreasing_offsets():
    with pytest.raises(ValueError, match="never decrease"):
        ct.align_positions([0, 2, 1, 3], [0, 1, 2, 3])


def _first_character_map(teacher, student_char):
    """Expected map of a byte-level teacher onto the character student, from token bytes."""
    out = np.full(teacher.vocab_size, -1)
    for t, b in enumerate(_token_bytes(teacher)):
        try:
            text = b.decode()
        except UnicodeDecodeError:
            continue  # a piece of a character
        if text and student_char.covers(text):
            out[t] = student_char.encode(text[0])[0]
    out[teacher.eos_id] = student_char.eos_id
    return out


def test_first_token_map_onto_characters(bpe, char):
    vocab_map = ct.first_token_map(bpe, char)
    assert vocab_map.shape == (bpe.vocab_size,) and vocab_map.dtype == np.int32
    np.testing.assert_array_equal(vocab_map, _first_character_map(bpe, char))
    assert vocab_map[bpe.pad_id] == -1 and vocab_map[bpe.eos_id] == char.eos_id
    assert (vocab_map >= 0).sum() > 100  # every ASCII byte and most merges
    assert ct.first_token_map(bpe, char, map_eos=False)[bpe.eos_id] == -1


def test_first_token_map_from_characters(bpe, char):
    vocab_map = ct.first_token_map(char, bpe)
    assert vocab_map[char.pad_id] == -1 and vocab_map[char.bos_id] == -1
    assert vocab_map[char.eos_id] == bpe.eos_id
    for c in "\n (09+=az~":
        assert vocab_map[char.encode(c)[0]] == bpe.encode(c)[0], c


def _dense_reference(idx, logp, log_tail, vocab_map, student_vocab):
    """float64 push-forward of the kept teacher buckets through a dense [V_T, V_S + 1] matrix
    (last column: no image); returns (student probabilities [R, V_S], tail [R])."""
    n_teacher = len(vocab_map)
    push = np.zeros((n_teacher, student_vocab + 1))
    push[np.arange(n_teacher), np.where(vocab_map >= 0, vocab_map, student_vocab)] = 1.0
    kept = np.zeros((idx.reshape(-1, idx.shape[-1]).shape[0], n_teacher))
    np.put_along_axis(kept, idx.reshape(-1, idx.shape[-1]), np.exp(logp.reshape(kept.shape[0], -1)
                                                                   .astype(np.float64)), 1)  # fmt: skip
    student = kept @ push
    return student[:, :-1], student[:, -1] + np.exp(log_tail.reshape(-1).astype(np.float64))


def _teacher_topk(rng, shape, n_teacher, k, temperature=2.0):
    """A random teacher's top-k [*shape, k] (float32, like the kernels) and its log tail."""
    logits = rng.normal(size=(*shape, n_teacher)) * temperature
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    idx = np.argsort(-logp, axis=-1)[..., :k]
    top = np.take_along_axis(logp, idx, -1)
    rest = 1.0 - np.exp(top).sum(-1)
    with np.errstate(divide="ignore"):
        tail = np.where(k < n_teacher, np.log(np.maximum(rest, 0.0)), -np.inf)
    return idx.astype(np.int32), top.astype(np.float32), tail.astype(np.float32), logp


def _check_projection(idx_s, logp_s, tail_s, idx, logp, tail, vocab_map, student_vocab):
    probs, ref_tail = _dense_reference(idx, logp, tail, vocab_map, student_vocab)
    slots = idx_s.shape[-1]
    idx_s, logp_s = idx_s.reshape(-1, slots), logp_s.reshape(-1, slots)
    np.testing.assert_allclose(np.exp(tail_s.reshape(-1)), ref_tail, rtol=1e-5, atol=1e-7)
    for r in range(idx_s.shape[0]):
        real = np.isfinite(logp_s[r])
        assert len(set(idx_s[r].tolist())) == slots, "slots must hold distinct ids"
        assert np.all(real[: real.sum()]), "merged ids come first"
        assert np.all(np.diff(logp_s[r][real]) <= 0), "most likely first"
        expect = np.zeros(student_vocab)
        expect[idx_s[r][real]] = np.exp(logp_s[r][real].astype(np.float64))
        np.testing.assert_allclose(expect, probs[r], rtol=1e-5, atol=1e-7)
        total = np.exp(logp_s[r].astype(np.float64)).sum() + np.exp(np.float64(tail_s.flat[r]))
        np.testing.assert_allclose(total, 1.0, rtol=1e-5)


@pytest.mark.parametrize("shape, k, kind", [((7,), 5, "random"), ((2, 3), 8, "random"),
                                            ((4,), 12, "collapse"), ((3,), 6, "none"),
                                            ((5,), 9, "underflow")])  # fmt: skip
def test_project_topk_matches_a_dense_reference(shape, k, kind):
    rng = np.random.default_rng(k)
    n_teacher, student_vocab = 40, 16
    idx, logp, tail, _ = _teacher_topk(rng, shape, n_teacher, k)
    if kind == "underflow":  # probabilities that underflowed to 0 in the teacher's float32
        moved = np.exp(logp[..., -3:].astype(np.float64)).sum(-1)
        logp[..., -3:] = -np.inf
        tail = np.logaddexp(tail, np.log(moved)).astype(np.float32)
    vocab_map = {"random": rng.integers(-1, student_vocab, n_teacher),
                 "collapse": np.where(np.arange(n_teacher) % 3 == 0, -1, np.arange(n_teacher) % 2),
                 "none": np.full(n_teacher, -1),
                 "underflow": np.arange(n_teacher) % student_vocab}[kind].astype(np.int32)  # fmt: skip
    idx_s, logp_s, tail_s = ct.project_topk(idx, logp, tail, vocab_map, student_vocab)
    assert idx_s.shape == logp_s.shape == (*shape, k) and tail_s.shape == shape
    assert idx_s.dtype == np.int32 and logp_s.dtype == tail_s.dtype == np.float32
    _check_projection(idx_s, logp_s, tail_s, idx, logp, tail, vocab_map, student_vocab)
    if kind == "none":
        np.testing.assert_allclose(tail_s, 0.0, atol=1e-6)


def test_project_topk_with_fewer_slots_moves_the_least_likely_to_the_tail():
    rng = np.random.default_rng(1)
    idx, logp, tail, _ = _teacher_topk(rng, (5,), 30, 10)
    vocab_map = np.arange(30, dtype=np.int32)  # one to one: ten distinct student ids
    idx_s, logp_s, tail_s = ct.project_topk(idx, logp, tail, vocab_map, 30, slots=4)
    np.testing.assert_array_equal(idx_s, idx[:, :4])
    np.testing.assert_allclose(logp_s, logp[:, :4], rtol=1e-6)
    rest = np.exp(logp[:, 4:].astype(np.float64)).sum(1) + np.exp(tail.astype(np.float64))
    np.testing.assert_allclose(np.exp(tail_s), rest, rtol=1e-5)
    # images outside the student's vocabulary count as no image
    small = ct.project_topk(idx, logp, tail, vocab_map, 3)
    _check_projection(*small, idx, logp, tail, np.where(vocab_map < 3, vocab_map, -1), 3)
    with pytest.raises(ValueError, match="slots"):
        ct.project_topk(idx, logp, tail, vocab_map, 3, slots=4)


def test_full_teacher_gives_the_exact_next_character_marginal(bpe, char):
    """k = V_T: the projection is the teacher's marginal of the next character (and of eos);
    only special tokens, pieces of characters and non-ASCII text are left in the tail."""
    vocab_map = ct.first_token_map(bpe, char)
    idx, logp, tail, full = _teacher_topk(np.random.default_rng(2), (6,), bpe.vocab_size,
                                          bpe.vocab_size, temperature=3.0)  # fmt: skip
    idx_s, logp_s, tail_s = ct.project_topk(idx, logp, tail, vocab_map, char.vocab_size)
    assert idx_s.shape == (6, char.vocab_size)
    texts = [b.decode(errors="replace") for b in _token_bytes(bpe)]
    marginal, rest = np.zeros((6, char.vocab_size)), np.zeros(6)
    for t, text in enumerate(texts):
        if t == bpe.eos_id:
            marginal[:, char.eos_id] += np.exp(full[:, t])
        elif text and char.covers(text):
            marginal[:, char.encode(text[0])[0]] += np.exp(full[:, t])
        else:
            rest += np.exp(full[:, t])
    got = np.zeros((6, char.vocab_size))
    np.put_along_axis(got, idx_s, np.exp(logp_s.astype(np.float64)), 1)
    np.testing.assert_allclose(got, marginal, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.exp(tail_s), rest, rtol=1e-4, atol=1e-8)


def test_teacher_completions(bpe, char):
    rows = [char.encode("12+3", add_eos=True), char.encode("7 * 4"), [char.eos_id]]
    got = ct.teacher_completions(char, bpe, rows + [char.encode("9", add_eos=True) + [0, 0]])
    assert got[:3] == [bpe.encode("12+3") + [bpe.eos_id], bpe.encode("7 * 4"), [bpe.eos_id]]
    assert got[3] == bpe.encode("9") + [bpe.eos_id]  # cut after the first eos
    # a character teacher takes the text up to the first character it cannot encode, no eos
    cut = ct.teacher_completions(bpe, char, [bpe.encode("3 € 4", add_eos=True)])
    assert cut == [char.encode("3 ")]


def _batch_case(student, teacher, texts, ends, m, rng):
    """Student rows [N, M] (eos where `ends`, cut at M), the teacher's rows padded to M_t and a
    full-vocabulary teacher's TopK on them (garbage on padding, as a scorer may leave it)."""
    rows = [(student.encode(t) + ([student.eos_id] if e else []))[:m] for t, e in zip(texts, ends)]
    completion, mask = ct.pad_rows(rows, m, student.pad_id)
    t_rows = ct.teacher_completions(student, teacher, ct.completion_rows(completion, mask))
    t_completion, t_mask = ct.pad_rows(t_rows, max(map(len, t_rows)) + 2, teacher.pad_id)
    idx, logp, tail, full = _teacher_topk(rng, t_completion.shape, teacher.vocab_size,
                                          teacher.vocab_size)  # fmt: skip
    idx[t_mask == 0], logp[t_mask == 0], tail[t_mask == 0] = 0, 0.0, 0.0
    return rows, completion, mask, t_rows, t_completion, t_mask, kernels.TopK(idx, logp, tail), full


def _expected_alignment(student, teacher, s_row, t_row):
    """Brute force on decoded prefixes: student position j pairs with the first teacher position
    reading the same text before it (eos only with eos); a repeated prefix is not a new start."""
    s_prefix = [student.decode(s_row[:j], stop_at_eos=False) for j in range(len(s_row))]
    t_prefix = [teacher.decode(t_row[:i], stop_at_eos=False) for i in range(len(t_row))]
    out = []
    for j, text in enumerate(s_prefix):
        s_eos = s_row[j] == student.eos_id
        same = [i for i, u in enumerate(t_prefix) if u == text and (t_row[i] == teacher.eos_id) == s_eos
                and (i == 0 or t_prefix[i - 1] != u)]  # fmt: skip
        fresh = j == 0 or s_prefix[j - 1] != text
        out.append(same[0] if same and fresh and "\ufffd" not in text else -1)
    return out


@pytest.mark.parametrize("direction", ["char_student", "bpe_student", "bpe_to_bpe",
                                       "small_to_bpe"])  # fmt: skip
def test_cross_tokenizer_topk_on_a_batch(bpe, bpe_small, char, direction):
    student, teacher = {"char_student": (char, bpe), "bpe_student": (bpe, char),
                        "bpe_to_bpe": (bpe, bpe_small),  # the teacher splits "€", "é"
                        "small_to_bpe": (bpe_small, bpe)}[direction]  # so does the student  # fmt: skip
    texts = ["(3 + 4) * 5 = 35", "12+3=15", "", "7 * 8 = 56 and more text", "3 €4 héllo"]
    ends = [True, True, True, False, True]
    if student is char:
        texts, ends = texts[:4], ends[:4]
    rng = np.random.default_rng(3)
    rows, completion, mask, t_rows, t_completion, t_mask, top, full = _batch_case(
        student, teacher, texts, ends, 18, rng)  # fmt: skip
    vocab_map = ct.first_token_map(teacher, student)
    got, aligned = ct.cross_tokenizer_topk(student, teacher, vocab_map, completion, mask,
                                           t_completion, t_mask, top)  # fmt: skip
    n, m = completion.shape
    slots = min(teacher.vocab_size, student.vocab_size)
    assert got.idx.shape == got.logp.shape == (n, m, slots) and got.log_tail.shape == (n, m)
    assert aligned.dtype == np.float32 and aligned.shape == (n, m)
    push = np.zeros((teacher.vocab_size, student.vocab_size))
    has = vocab_map >= 0
    push[np.flatnonzero(has), vocab_map[has]] = 1.0
    for r in range(n):
        expect = _expected_alignment(student, teacher, rows[r], t_rows[r])
        np.testing.assert_array_equal(aligned[r, : len(rows[r])], np.array(expect) >= 0)
        assert not aligned[r, len(rows[r]) :].any()
        for j, i in enumerate(expect):
            dense = np.zeros(student.vocab_size)
            np.put_along_axis(dense, got.idx[r, j], np.exp(got.logp[r, j].astype(np.float64)), 0)
            if i < 0:
                np.testing.assert_array_equal(dense, 0.0)
                assert got.log_tail[r, j] == 0.0
                continue
            np.testing.assert_allclose(dense, np.exp(full[r, i]) @ push, rtol=1e-5, atol=1e-8)
            assert len(set(got.idx[r, j].tolist())) == slots
    eos_rows = [r for r in range(n) if ends[r] and teacher.eos_id in t_rows[r]]
    assert eos_rows and all(aligned[r, len(rows[r]) - 1] for r in eos_rows), "eos pairs with eos"
    assert aligned.sum() >= 0.3 * mask.sum()


def test_translator_builds_the_teacher_batch_and_translates_back(bpe, char):
    rows = [char.encode("12+3", add_eos=True), char.encode("(3 + 4) * 5 = 35", add_eos=True)]
    completion, mask = ct.pad_rows(rows, 8, char.pad_id)
    prompt = np.ones((2, 4), np.int32)
    batch = data.CompletionBatch(prompt_tokens=prompt, prompt_mask=prompt, completion=completion,
                                 completion_mask=mask)  # fmt: skip
    translator = ct.Translator(char, bpe)
    with pytest.raises(ValueError, match="its own prompt tokens"):
        translator.teacher_batch(batch)
    batch = batch.replace(teacher_prompt_tokens=prompt + 1, teacher_prompt_mask=prompt)
    teacher_batch = translator.teacher_batch(batch)
    assert teacher_batch.completion.shape[1] % 8 == 0
    np.testing.assert_array_equal(teacher_batch.teacher_prompt()[0], prompt + 1)
    rows_t = ct.completion_rows(teacher_batch.completion, teacher_batch.completion_mask)
    assert rows_t == ct.teacher_completions(char, bpe, ct.completion_rows(completion, mask))
    rng = np.random.default_rng(4)
    idx, logp, tail, _ = _teacher_topk(rng, teacher_batch.completion.shape, bpe.vocab_size, 6)
    top = kernels.TopK(idx, logp, tail)
    got, aligned = translator.to_student(batch, teacher_batch, top)
    want, want_aligned = ct.cross_tokenizer_topk(char, bpe, translator.vocab_map, completion,
                                                 mask, teacher_batch.completion,
                                                 teacher_batch.completion_mask, top)  # fmt: skip
    np.testing.assert_array_equal(aligned, want_aligned)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert got.idx.shape == (2, 8, 6) and aligned[:, 0].all()


def test_eos_pairs_only_with_eos_of_the_same_text(bpe, char):
    """The student stops after " 18" where the teacher's text goes on: its eos reads the same
    prefix as the teacher's "+" position, yet "the end" is not "+": no loss there."""
    completion, mask = ct.pad_rows([char.encode(" 18", add_eos=True)], 5, char.pad_id)
    t_completion, t_mask = ct.pad_rows([bpe.encode(" 18+3", add_eos=True)], 6, bpe.pad_id)
    assert ct.char_offsets(bpe, t_completion[0, :4]).tolist() == [0, 3, 4, 5, 5]
    idx, logp, tail, _ = _teacher_topk(np.random.default_rng(5), (1, 6), bpe.vocab_size, 4)
    _, aligned = ct.cross_tokenizer_topk(char, bpe, ct.first_token_map(bpe, char), completion,
                                         mask, t_completion, t_mask, kernels.TopK(idx, logp, tail))  # fmt: skip
    np.testing.assert_array_equal(aligned, [[1, 0, 0, 0, 0]])
