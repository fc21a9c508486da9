"""The sampler: greedy parity with transformers, logprobs equal to training's, sampling law."""

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxpost import models, sampler
from jaxpost.models import hf

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3], [20, 21, 22, 23, 24]]


def _teacher_forced_logprobs(config, params, rollouts):
    tokens, mask = rollouts.sequences()
    logits = models.apply(config, params, tokens, mask)
    P = rollouts.prompt_tokens.shape[1]
    logp = jax.nn.log_softmax(logits[:, P - 1 : -1], axis=-1)
    return jnp.take_along_axis(logp, rollouts.tokens[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("case", ["qwen2_tied", "llama_gqa_untied"])
def test_greedy_matches_transformers_generate(case, tmp_path):
    import torch

    path, torch_model = hf_models.save_case(case, tmp_path, seed=11)
    config, params = hf.load_hf(path)
    new = 12
    out = sampler.generate(
        config, params, PROMPTS, max_new_tokens=new, temperature=0, eos_id=config.eos_id, seed=0
    )
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = torch_model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new, do_sample=False, eos_token_id=config.eos_id,
                pad_token_id=config.pad_id, output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        ref_tokens = ref.sequences[0, len(prompt) :].tolist()
        ours = np.asarray(out.tokens[i, : int(out.lengths[i])]).tolist()
        for t, (a, b) in enumerate(zip(ours, ref_tokens)):
            if a != b:  # allowed only where transformers' own top two are (near) tied
                top2 = torch.topk(ref.scores[t][0].float(), 2).values
                assert float(top2[0] - top2[1]) < 1e-3, (i, t, a, b)
                break
        else:
            assert len(ours) == len(ref_tokens), (ours, ref_tokens)


@pytest.mark.parametrize("new", [10, 40])  # 40: four decode segments, the cache grown thrice
def test_logprobs_equal_teacher_forced_apply(tmp_path, new):
    path, _ = hf_models.save_case("llama_gqa_untied", tmp_path, seed=5)
    config, params = hf.load_hf(path)
    assert len(sampler.segment_ends(sampler._bucket(new, 16))) == (1 if new == 10 else 4)
    out = sampler.generate(
        config, params, PROMPTS, max_new_tokens=new, temperature=1.0, eos_id=config.eos_id,
        seed=3, num_samples=3, top_k=20, with_entropy=True,
    )  # fmt: skip
    assert out.tokens.shape == (len(PROMPTS) * 3, new)
    want = _teacher_forced_logprobs(config, params, out)
    mask = np.asarray(out.mask, bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], np.asarray(want)[mask], atol=1e-4)
    assert np.all(np.asarray(out.logprobs)[~mask] == 0)
    # Truncated sampling puts more mass on the chosen token than the full policy does.
    assert np.all(np.asarray(out.sample_logprobs)[mask] >= np.asarray(out.logprobs)[mask] - 1e-5)
    ent = np.asarray(out.entropy)[mask]
    assert np.all(ent >= 0) and np.all(ent <= np.log(config.vocab_size) + 1e-5)


def _peaked_model(vocab=12):
    config = models.get_config("tiny", vocab_size=vocab, tie_embeddings=False)
    params = models.init(config, seed=4)
    params["lm_head"] = params["lm_head"] * 6.0  # probabilities from ~0.25 down to ~0.02
    return config, params


def _nucleus_reference(p, top_p):
    """Top-p by its definition, on one row of probabilities: sorted descending, a token is kept
    when the mass before it is below top_p (ties broken by index)."""
    order = np.argsort(-p, kind="stable")
    kept = np.zeros(p.shape, bool)
    kept[order[np.cumsum(p[order]) - p[order] < top_p]] = True
    return kept


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (0.7, None, None), (1.3, 5, None), (1.0, None, 0.8), (0.9, 6, 0.9)],
)
def test_empirical_frequencies_follow_the_sampling_distribution(temperature, top_k, top_p):
    config, params = _peaked_model()
    prompt = [3, 4, 5]
    n = 4000
    out = sampler.generate(
        config, params, [prompt], max_new_tokens=1, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_id=None, seed=123, num_samples=n,
    )  # fmt: skip
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=config.vocab_size)

    logits = np.asarray(models.apply(config, params, jnp.asarray([prompt]))[0, -1], np.float64)
    z = logits / temperature
    keep = np.ones_like(z, bool)
    if top_k is not None:
        keep &= z >= np.sort(z)[-top_k]
    if top_p is not None:
        zz = np.where(keep, z, -np.inf)
        p = np.exp(zz - zz.max())
        keep &= _nucleus_reference(p / p.sum(), top_p)
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    assert counts[~keep].sum() == 0, "a token outside the truncated support was sampled"
    assert keep.sum() >= 3 and probs.max() < 0.9  # the test distribution is not degenerate
    support = keep & (probs * n >= 5)
    expected = probs[support] * n
    observed = counts[support]
    expected *= observed.sum() / expected.sum()
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    # The reported sampling logprobs are those of the truncated, tempered distribution.
    np.testing.assert_allclose(
        np.asarray(out.sample_logprobs[:, 0]),
        np.log(probs[np.asarray(out.tokens[:, 0])]),
        atol=1e-4,
    )


def test_top1_sampling_equals_greedy_and_seeds_are_reproducible():
    config, params = _peaked_model(vocab=32)
    kw = dict(max_new_tokens=8, eos_id=None, num_samples=2)
    greedy = sampler.generate(config, params, PROMPTS, temperature=0, seed=0, **kw)
    top1 = sampler.generate(config, params, PROMPTS, temperature=1.3, top_k=1, seed=9, **kw)
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    a = sampler.generate(config, params, PROMPTS, temperature=1.0, seed=5, **kw)
    b = sampler.generate(config, params, PROMPTS, temperature=1.0, seed=5, **kw)
    c = sampler.generate(config, params, PROMPTS, temperature=1.0, seed=6, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # A row's randomness does not depend on the bucket it was padded into.
    first = sampler.generate(config, params, PROMPTS[:1], temperature=1.0, seed=5, **kw)
    np.testing.assert_array_equal(first.tokens, a.tokens[:2])


def test_rows_stop_at_eos_and_stop_ids():
    config, params = _peaked_model(vocab=32)
    free = sampler.generate(
        config, params, PROMPTS, max_new_tokens=8, temperature=0, eos_id=None, seed=0
    )
    stop = int(free.tokens[1, 2])
    out = sampler.generate(
        config,
        params,
        PROMPTS,
        max_new_tokens=8,
        temperature=0,
        eos_id=None,
        stop_ids=[stop],
        seed=0,
        pad_id=0,
    )
    for i in range(len(PROMPTS)):
        row = np.asarray(free.tokens[i]).tolist()
        n = row.index(stop) + 1 if stop in row else 8
        assert int(out.lengths[i]) == n
        assert np.asarray(out.tokens[i, :n]).tolist() == row[:n]
        assert np.all(np.asarray(out.tokens[i, n:]) == 0)
        assert np.asarray(out.mask[i]).tolist() == [1] * n + [0] * (8 - n)


def test_shapes_are_bucketed_into_few_programs():
    config, params = _peaked_model(vocab=29)  # a vocabulary no other test compiles for
    before = sampler.compiled_program_count()
    for prompts in ([[3, 4]], [[3, 4, 5, 6, 7, 8, 9]], [[1], [2, 3]], [[4] * 11, [5] * 3, [6]]):
        for new in (5, 9, 16):
            sampler.generate(
                config, params, prompts, max_new_tokens=new, temperature=1.0, eos_id=None, seed=0
            )
    assert sampler.compiled_program_count() - before == 1


@pytest.mark.parametrize("new", [6, 40])  # 40: the sharded cache grown between segments
def test_batch_sharded_over_a_mesh_gives_the_same_tokens(new):
    config, params = _peaked_model(vocab=32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2, 1), ("data", "fsdp", "tensor"))
    kw = dict(max_new_tokens=new, temperature=1.0, eos_id=None, seed=2, num_samples=3)
    plain = sampler.generate(config, params, PROMPTS, **kw)
    sharded = sampler.generate(config, params, PROMPTS, mesh=mesh, **kw)
    np.testing.assert_array_equal(plain.tokens, sharded.tokens)
    np.testing.assert_allclose(plain.logprobs, sharded.logprobs, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[3], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "non-empty list"),
        (dict(prompts=[[3] * 300]), "longer than the model's maximum"),
        (dict(prompts=[[3] * 250]), "exceeds the model's maximum sequence length"),
        (dict(prompts=[[3, 64]]), r"outside the vocabulary \[0, 64\)"),
        (dict(prompts=[[-1]]), "outside the vocabulary"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must lie in \(0, 1\]"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(num_samples=0), "num_samples must be >= 1"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    config = models.get_config("tiny")
    args = dict(prompts=[[3, 4]], max_new_tokens=8, temperature=1.0, eos_id=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sampler.generate(config, None, args.pop("prompts"), **args)


def test_evaluation_chunks_are_even_and_one_program(monkeypatch):
    """`evaluate.sample` splits problems x samples over as few chunks as `max_rows` allows,
    evenly, every chunk padded to the same rows (one compiled program), and returns every
    problem's n samples, the filler rows dropped."""
    from jaxpost import evaluate
    from jaxpost.tasks.addition import Addition
    from jaxpost.tokenizers import CharTokenizer

    assert evaluate.chunk_rows(384, 16) == 3072  # two chunks of 192 problems, not 256 and 128
    assert evaluate.chunk_rows(384, 8) == 3072 and evaluate.chunk_rows(5, 2, max_rows=4) == 8
    tok, task = CharTokenizer(), Addition()
    config = models.get_config("tiny", vocab_size=tok.vocab_size, eos_id=tok.eos_id)
    params = models.init(config, seed=0)
    problems = task.prompts("test", 5, seed=0)
    shapes, real = [], sampler.generate_rows
    monkeypatch.setattr(sampler, "generate_rows",
                        lambda c, p, tokens, *a, **k: shapes.append(tokens.shape)
                        or real(c, p, tokens, *a, **k))  # fmt: skip
    chunked = evaluate.sample(config, params, tok, task, problems, n=2, max_new_tokens=4,
                              max_rows=4)  # fmt: skip
    assert len(shapes) == 3 and len(set(shapes)) == 1 and shapes[0][0] == 8
    assert chunked.tokens.shape == (10, 4) and chunked.answer_ok.shape == (5, 2)
    prompts = [tok.encode(task.render_prompt(p), add_bos=True) for p in problems]
    assert chunked.prompts == prompts


@pytest.mark.parametrize("vocab", [7, 99, 4096])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_nucleus_without_a_sort_keeps_what_the_sorted_cumsum_keeps(vocab, top_p):
    from jaxpost import token_choice

    rng = np.random.default_rng(vocab)
    z = rng.normal(size=(16, vocab)) * rng.uniform(0.1, 5, (16, 1))  # flat to peaked rows
    z[0, : vocab // 2] = -np.inf  # a row top-k truncated first
    probs = jax.nn.softmax(jnp.asarray(z, jnp.float32), axis=-1)
    got = np.asarray(probs >= token_choice.nucleus_floor(probs, top_p)[:, None])
    p = np.exp(z - z.max(-1, keepdims=True))
    want = np.stack([_nucleus_reference(row, top_p) for row in p / p.sum(-1, keepdims=True)])
    np.testing.assert_array_equal(got, want)


def test_nucleus_keeps_or_drops_tokens_of_equal_probability_together():
    from jaxpost import token_choice

    probs = jnp.asarray([[0.3, 0.3, 0.2, 0.2], [0.4, 0.2, 0.2, 0.2]], jnp.float32)
    # (a sort keeps the first of equal tokens by index: [1, 0, 0, 0] and [1, 0, 0, 0] at 0.3,
    # [1, 1, 0, 0] and [1, 1, 0, 0] at 0.5, [1, 1, 1, 0] and [1, 1, 1, 0] at 0.7)
    for top_p, want in [(0.3, [[1, 1, 0, 0], [1, 0, 0, 0]]),
                        (0.5, [[1, 1, 0, 0], [1, 1, 1, 1]]),
                        (0.7, [[1, 1, 1, 1], [1, 1, 1, 1]])]:
        got = probs >= token_choice.nucleus_floor(probs, top_p)[:, None]
        np.testing.assert_array_equal(np.asarray(got, int), want, err_msg=f"top_p {top_p}")


def test_segmented_decode_draws_what_one_segment_draws(monkeypatch):
    # Decoding in segments over a growing cache changes which slots attention reads, not what
    # it computes: the empty slots it skips were masked out.
    config, params = _peaked_model(vocab=40)
    kw = dict(max_new_tokens=48, temperature=1.0, eos_id=None, seed=7, num_samples=2)
    runs = []
    for segments in (1, 4):
        monkeypatch.setattr(sampler, "DECODE_SEGMENTS", segments)
        sampler._generate_program.clear_cache()  # the segments are not a jit argument
        runs.append(sampler.generate(config, params, PROMPTS, **kw))
    one, four = runs
    np.testing.assert_array_equal(one.tokens, four.tokens)
    np.testing.assert_allclose(one.logprobs, four.logprobs, atol=1e-5)
    sampler._generate_program.clear_cache()


def test_segment_ends_cover_the_budget_in_at_most_four_loops():
    assert sampler.segment_ends(16) == [16]
    assert sampler.segment_ends(32) == [16, 32]
    assert sampler.segment_ends(128) == [32, 64, 96, 128]
    assert sampler.segment_ends(100) == [25, 50, 75, 100]  # generate_rows' unbucketed width


def test_token_choice_reductions_are_jax_s_own():
    # first_argmax, categorical and token_logprob replace jnp.argmax, jax.random.categorical
    # and log_softmax-then-take: same tokens, same numbers, including ties, infinities and NaN.
    from jaxpost import token_choice

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 300)).astype(np.float32) * rng.uniform(0.1, 20, (12, 1))
    x[0] = 1.0  # all tied: the first index
    x[1, [5, 9]] = 50.0  # a tie at the top
    x[2, 7] = np.inf
    x[3, :] = -np.inf
    x[3, 11] = 0.0  # a masked (top-k / top-p) row
    x[4, [3, 8]] = np.nan  # the first NaN, as jnp.argmax
    x = jnp.asarray(x)
    np.testing.assert_array_equal(token_choice.first_argmax(x), jnp.argmax(x, axis=-1))
    keys = jax.random.split(jax.random.key(3), 12)
    rows = np.r_[0:2, 3, 5:12]  # finite rows (inf and NaN make the logprob NaN either way)
    tokens = token_choice.categorical(keys, x)
    np.testing.assert_array_equal(tokens, jax.vmap(jax.random.categorical)(keys, x))
    want = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), tokens[:, None], axis=-1)[:, 0]
    got = token_choice.token_logprob(x, tokens)
    np.testing.assert_allclose(got[rows], want[rows], rtol=0, atol=1e-6)
