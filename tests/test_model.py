"""Properties of the decoder: causality, padding invariance, KV-cache equivalence, axes, configs."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpost
from jaxpost import models

CONFIGS = {
    "qwen2": models.get_config("tiny"),
    "llama_untied_rope_scaling": models.get_config(
        "tiny", family="llama", qkv_bias=False, tie_embeddings=False,
        rope_scaling=models.RopeScaling(8.0, 1.0, 4.0, 16),
    ),
    "qwen3_head_dim": models.get_config("tiny", family="qwen3", qkv_bias=False, qk_norm=True, head_dim=24),
}  # fmt: skip


def _params(config):
    return models.init(config, seed=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_at_t_do_not_depend_on_later_tokens(name):
    config = CONFIGS[name]
    params = _params(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (3, 12))
    base = models.apply(config, params, jnp.asarray(tokens))
    for t in (0, 5, 10):
        changed = tokens.copy()
        changed[:, t + 1 :] = rng.integers(0, config.vocab_size, changed[:, t + 1 :].shape)
        out = models.apply(config, params, jnp.asarray(changed))
        chex.assert_trees_all_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        # and the change really reaches later positions
        assert float(jnp.max(jnp.abs(out[:, t + 1 :] - base[:, t + 1 :]))) > 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_on_either_side_never_changes_real_logits(name):
    config = CONFIGS[name]
    params = _params(config)
    tokens = np.random.default_rng(1).integers(3, config.vocab_size, (1, 7))
    alone = models.apply(config, params, jnp.asarray(tokens))[0]
    pad = np.zeros((1, 5), np.int64)
    left = np.concatenate([pad, tokens], axis=1)
    left_mask = np.concatenate([pad, np.ones_like(tokens)], axis=1)
    right = np.concatenate([tokens, pad + 9], axis=1)  # garbage in the padding
    right_mask = np.concatenate([np.ones_like(tokens), pad], axis=1)
    got_left = models.apply(config, params, jnp.asarray(left), jnp.asarray(left_mask))[0, 5:]
    got_right = models.apply(config, params, jnp.asarray(right), jnp.asarray(right_mask))[0, :7]
    chex.assert_trees_all_close(got_left, alone, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(got_right, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_packed_row_gives_each_example_the_logits_it_has_alone(name):
    """Segment ids in the attention mask (`data.packed_sft_batch`): every example restarts its
    positions and attends only itself, so packing never changes a real token's logits."""
    config = CONFIGS[name]
    params = _params(config)
    rng = np.random.default_rng(3)
    parts = [rng.integers(3, config.vocab_size, n) for n in (5, 1, 7)]
    row = np.concatenate([*parts, np.full(3, 9)])[None]  # garbage in the trailing padding
    segments = np.concatenate([np.full(len(p), k + 1) for k, p in enumerate(parts)] + [[0] * 3])
    packed = models.apply(config, params, jnp.asarray(row), jnp.asarray(segments[None]))[0]
    at = 0
    for p in parts:
        alone = models.apply(config, params, jnp.asarray(p[None]))[0]
        chex.assert_trees_all_close(packed[at : at + len(p)], alone, atol=1e-5, rtol=0)
        at += len(p)


def test_positions_restart_per_segment_and_count_through_gaps():
    mask = jnp.asarray([[0, 0, 1, 1, 1, 0, 1], [1, 1, 2, 2, 2, 3, 0], [1, 2, 2, 0, 3, 3, 3]])
    np.testing.assert_array_equal(models.positions_from_mask(mask),
                                  [[0, 0, 0, 1, 2, 2, 3], [0, 1, 0, 1, 2, 0, 0],
                                   [0, 0, 1, 1, 0, 1, 2]])  # fmt: skip


@pytest.mark.parametrize("presliced", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_prefill_and_decode_equal_full_forward(name, presliced):
    """`presliced`: the blocks' weights sliced per layer once (`layer_params`), as the sampler's
    decode loop passes them."""
    config = CONFIGS[name]
    params = _params(config)
    rng = np.random.default_rng(2)
    # Left-padded prompts of lengths 5 and 3, then 4 decode steps.
    prompt_len, steps = 5, 4
    tokens = rng.integers(3, config.vocab_size, (2, prompt_len + steps))
    mask = np.ones_like(tokens)
    mask[1, :2] = 0
    full = models.apply(config, params, jnp.asarray(tokens), jnp.asarray(mask))

    cache = models.init_cache(config, batch=2, capacity=prompt_len + steps)
    positions = models.positions_from_mask(jnp.asarray(mask))
    layers = models.layer_params(config, params) if presliced else None
    step = jax.jit(functools.partial(models.forward_cached, layers=layers), static_argnums=0)
    logits, cache = step(
        config, params, jnp.asarray(tokens[:, :prompt_len]), positions[:, :prompt_len],
        jnp.asarray(mask[:, :prompt_len]), cache, 0,
    )  # fmt: skip
    chex.assert_trees_all_close(logits[0], full[0, :prompt_len], atol=1e-5, rtol=0)
    chex.assert_trees_all_close(logits[1, 2:], full[1, 2:prompt_len], atol=1e-5, rtol=0)
    for i in range(prompt_len, prompt_len + steps):
        logits, cache = step(
            config, params, jnp.asarray(tokens[:, i : i + 1]), positions[:, i : i + 1],
            jnp.ones((2, 1), bool), cache, jnp.int32(i),
        )  # fmt: skip
        chex.assert_trees_all_close(logits[:, 0], full[:, i], atol=1e-5, rtol=0)


def test_logical_axes_name_every_dimension():
    for config in CONFIGS.values():
        params, axes = _params(config), models.logical_axes(config)
        flat_p = jax.tree_util.tree_leaves_with_path(params)
        flat_a = dict(
            jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
        )
        assert len(flat_p) == len(flat_a)
        for path, leaf in flat_p:
            names = flat_a[path]
            assert len(names) == leaf.ndim, (path, names, leaf.shape)
            assert set(names) <= set(models.LOGICAL_AXES)
        assert axes["embed"] == ("vocab", "embed")


def test_parameter_count_and_abstract_shapes_agree():
    for config in [*CONFIGS.values(), models.get_config("qwen2.5-0.5b")]:
        abstract = models.abstract_params(config)
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == config.num_params()
    # The public Qwen2.5-0.5B has 494M parameters.
    assert round(models.get_config("qwen2.5-0.5b").num_params() / 1e6) == 494


def test_bfloat16_compute_and_params():
    config = models.get_config("tiny", dtype="bfloat16", param_dtype="bfloat16")
    params = models.init(config)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    logits = jax.jit(models.apply, static_argnums=0)(config, params, jnp.ones((2, 6), jnp.int32))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)
    ref = models.apply(
        config.replace(dtype="float32", param_dtype="float32"),
        jax.tree.map(lambda x: x.astype(jnp.float32), params),
        jnp.ones((2, 6), jnp.int32),
    )
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_and_unrolled_layers_compute_the_same_function(name):
    """One stacked parameter tree, two ways to apply it: `lax.scan` and a Python loop."""
    config = CONFIGS[name]
    params = _params(config)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, config.vocab_size, (2, 9)))
    scanned = models.apply(config.replace(scan_layers=True), params, tokens)
    unrolled = models.apply(config.replace(scan_layers=False), params, tokens)
    chex.assert_trees_all_close(scanned, unrolled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stacked_init_draws_what_blocks_built_one_by_one_draw(name):
    """The stack's layer i equals a lone block built i-th from the same key stream (the layout
    before the stack), so a seed gives the same model as it always did."""
    from flax import nnx

    from jaxpost.models import transformer

    config = CONFIGS[name].replace(n_layers=3)
    stacked = models.init(config, seed=4)["layers"]
    rngs = nnx.Rngs(params=jax.random.key(4))
    rngs.params()  # the embedding's draw comes first
    for i in range(config.n_layers):
        block = nnx.to_pure_dict(nnx.state(transformer.Block(config, rngs), nnx.Param))
        chex.assert_trees_all_equal(jax.tree.map(lambda a, i=i: a[i], stacked), block)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("remat", ["full", "dots", "attn"])
def test_remat_gives_the_same_gradients(remat, scan_layers):
    config = models.get_config("tiny", n_layers=3)
    params = _params(config)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 8)))

    def loss(p, c):
        return jnp.mean(jax.nn.log_softmax(models.apply(c, p, tokens))[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # eager op-by-op dispatch took ~20 s
    g = grad(params, config.replace(scan_layers=False))
    g_remat = grad(params, config.replace(remat=remat, scan_layers=scan_layers))
    chex.assert_trees_all_close(g_remat, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(n_heads=3, n_kv_heads=2), "multiple of n_kv_heads"),
        (dict(family="gpt2"), "family must be one of"),
        (dict(head_dim=15), "head_dim must be even"),
        (dict(dtype="float8"), "dtype must be one of"),
        (dict(vocab_size=0), "vocab_size must be >= 1"),
        (dict(remat="selective"), r"unknown remat policy 'selective'; use one of"),
    ],
)
def test_bad_config_raises_with_the_problem_named(overrides, match):
    with pytest.raises(jaxpost.UserError, match=match):
        models.get_config("tiny", **overrides)


def test_unknown_preset_and_cache_too_long():
    with pytest.raises(ValueError, match="unknown model preset"):
        models.get_config("gpt-5")
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        models.init_cache(models.get_config("tiny"), 1, 10_000)


@pytest.mark.parametrize("dtype, tol", [("float64", 0.0), ("float32", 1e-6), ("bfloat16", 1e-2)])
def test_embedding_gradient_by_gather_equals_the_scatter(dtype, tol):
    """models.embedding.lookup's backward (sorted segment sums, then a gather) gives the same
    table gradient as autodiff's scatter-add, repeated tokens, negative ids (row V + t, as
    `take` reads them) and absent rows included."""
    from jaxpost.models import embedding

    rng = np.random.default_rng(0)
    with jax.enable_x64(dtype == "float64"):
        table = jnp.asarray(rng.normal(size=(37, 6)), dtype)
        tokens = jnp.asarray(rng.integers(0, 37, (4, 19)))  # 76 tokens over 37 rows: repeats
        tokens = tokens.at[0, :5].set(3).at[1, :3].set(-2)  # -2 is row 35
        weight = jnp.asarray(rng.normal(size=(4, 19, 6)), dtype)
        loss = lambda t, look: (look(t, tokens).astype(jnp.float32) * weight).sum()  # noqa: E731
        want = jax.grad(loss)(table, lambda t, i: jnp.take(t, i, axis=0))
        got = jax.grad(loss)(table, embedding.lookup)
    assert got.dtype == table.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               atol=tol, rtol=tol)  # fmt: skip
    absent = np.setdiff1d(np.arange(37), np.asarray(tokens) % 37)
    assert absent.size and not np.asarray(got, np.float64)[absent].any()


def test_embedding_gradient_holds_no_float32_table():
    """Autodiff's bf16 scatter-add runs in float32 on XLA:CPU (a [V, D] float32 temporary); the
    gather-based backward's temporaries do not grow with the table (here ~1/10 of it)."""
    from jaxpost.models import embedding

    V, D, N = 65_536, 64, 512
    args = (jax.ShapeDtypeStruct((V, D), jnp.bfloat16), jax.ShapeDtypeStruct((N, D), jnp.float32))
    tokens = jnp.arange(N) % 97

    def temp(look):
        grad = jax.grad(lambda t, w: (look(t, tokens).astype(jnp.float32) * w).sum())
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    table_bytes = V * D * 2
    assert temp(embedding.lookup) < 0.2 * table_bytes < temp(lambda t, i: jnp.take(t, i, axis=0))


def test_masked_softmax_equals_softmax_and_its_autodiff_gradient():
    """The attention's softmax (its own derivative, from the probabilities) gives
    jax.nn.softmax's values and autodiff's gradient, masked keys and a row with every key
    masked included."""
    from jaxpost.models.transformer import masked_softmax

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):  # float64: the two backwards' arithmetic differs, not their math
        scores = jnp.asarray(rng.normal(size=(2, 3, 5, 7)) * 4)
        mask = jnp.asarray(rng.random((2, 1, 5, 7)) < 0.7).at[0, 0, 1].set(False)
        bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float64).min)
        weight = jnp.asarray(rng.normal(size=scores.shape))

        def loss(s, softmax):
            return (softmax(s) * weight).sum()

        ours = lambda s: masked_softmax(s, bias, 0.3)  # noqa: E731
        ref = lambda s: jax.nn.softmax(s * 0.3 + bias, axis=-1)  # noqa: E731
        np.testing.assert_array_equal(ours(scores), ref(scores))
        got, want = jax.grad(loss)(scores, ours), jax.grad(loss)(scores, ref)
    np.testing.assert_allclose(got, want, atol=1e-12, rtol=1e-10)
    # a masked key of a row with a real key gets no gradient (the all-masked row is uniform)
    masked = np.broadcast_to(~np.asarray(mask), got.shape).copy()
    masked[0, :, 1] = False
    assert not np.asarray(got)[masked].any()
