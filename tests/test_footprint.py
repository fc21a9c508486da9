"""The sparse footprint (jaxpost.footprint) against float64 numpy on full unpadded forwards."""

import jax
import numpy as np
import pytest

from jaxpost import footprint, inputs, models
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size, eos_id=TOK.eos_id)


def _reference(base_logits, logits):
    """flip, rank of the model's argmax under the base, base entropy: float64 per position."""
    z = np.asarray(base_logits, np.float64)
    choice = np.asarray(logits).argmax(-1)
    flip = choice != z.argmax(-1)
    chosen = np.take_along_axis(z, choice[..., None], -1)
    rank = (z > chosen).sum(-1)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -(p * np.log(p)).sum(-1)
    return flip, rank, entropy


def test_position_stats_match_numpy():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    other = base + rng.normal(size=base.shape).astype(np.float32) * 2
    got = jax.device_get(footprint.position_stats(base, other))
    want = _reference(base, other)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
    assert want[0].any() and not want[0].all()  # both kinds of positions are exercised
    flip, rank, _ = jax.device_get(footprint.position_stats(base, base))
    assert not flip.any() and not rank.any()  # a model against itself changes nothing


def test_summary_counts_flips_per_problem():
    flip = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]], bool)
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]], bool)
    rank = np.array([[2, 0, 0], [0, 0, 7], [0, 0, 0], [0, 0, 0]])
    entropy = np.array([[2.0, 1.0, 9.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.5, 9, 9]])
    fp = footprint.summarize(flip, rank, entropy, mask, rows_per_problem=2)
    s = fp.summary
    assert s["flips"] == 2 and s["flip_frac"] == pytest.approx(2 / 9)
    assert s["entropy_at_flips"] == pytest.approx(1.5)
    assert s["entropy_all"] == pytest.approx((2 + 1 + 3 + 1.5 + 0.5) / 9)
    assert s["promoted_rank_mean"] == 4.5 and s["promoted_rank_median"] == 4.5
    assert s[f"promoted_in_top{footprint.TOP_K}"] == 0.5  # ranks 2 and 7
    assert fp.per_problem["flip_frac"] == pytest.approx([2 / 5, 0.0])
    assert fp.per_problem["entropy_excess"][0] == pytest.approx(1.5 - 6 / 5)
    assert np.isnan(fp.per_problem["entropy_excess"][1])  # no flips: undefined, not 0


def test_footprint_of_a_model_matches_its_full_forward():
    """Ragged prompts, padded completions: every real position's statistics equal those of a
    forward over that row alone, without padding."""
    # a random init's argmax copies its input token: scaled up, its layers decide; `other` is
    # the base nudged, so some argmaxes move and some do not
    scaled = jax.tree.map(lambda x: x * 3, models.init(CONFIG, seed=0))
    other = jax.tree.map(lambda a, b: a + 0.3 * b, scaled, models.init(CONFIG, seed=1))
    base = inputs.Model(CONFIG, scaled, TOK, "test")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, TOK.vocab_size, n).tolist() for n in (3, 7, 5, 4)]
    lengths = [4, 6, 1, 6]
    tokens = rng.integers(3, TOK.vocab_size, (4, 6)).astype(np.int32)
    mask = (np.arange(6)[None] < np.array(lengths)[:, None]).astype(np.int32)
    flips, masks = [], []
    for p, t, n in zip(prompts, tokens, lengths):
        seq = np.asarray(p + t[:n].tolist())[None]
        z = [np.asarray(models.apply(CONFIG, params, seq))[0, len(p) - 1 : len(p) - 1 + n]
             for params in (base.params, other)]  # fmt: skip
        f, r, e = _reference(*z)
        flips.append((f, r, e))
        masks.append(n)
    fp = footprint.footprint(base, base.params, CONFIG, other, prompts, tokens, mask, 2)
    flip = np.concatenate([f for f, _, _ in flips])
    rank = np.concatenate([r for _, r, _ in flips])
    entropy = np.concatenate([e for _, _, e in flips])
    assert 0 < flip.sum() < len(flip)
    assert fp.summary["flips"] == flip.sum()
    assert fp.summary["entropy_all"] == pytest.approx(entropy.mean(), rel=1e-4)
    assert fp.summary["entropy_at_flips"] == pytest.approx(entropy[flip].mean(), rel=1e-4)
    assert fp.summary["promoted_rank_mean"] == pytest.approx(rank[flip].mean())
    per = [flip[:10].mean(), flip[10:].mean()]  # problem 0: rows 0-1 (10 positions), 1: rows 2-3
    np.testing.assert_allclose(fp.per_problem["flip_frac"], per)
    same = footprint.footprint(base, base.params, CONFIG, base.params, prompts, tokens, mask, 2)
    assert same.summary["flips"] == 0 and np.isnan(same.summary["entropy_at_flips"])


def test_another_vocabulary_is_refused():
    base = inputs.Model(CONFIG, None, TOK, "test")
    wider = models.get_config("tiny", vocab_size=TOK.vocab_size + 1, eos_id=TOK.eos_id)
    with pytest.raises(ValueError, match="one vocabulary"):
        footprint.footprint(base, None, wider, None, [[3]], np.zeros((1, 1)), np.ones((1, 1)), 1)
