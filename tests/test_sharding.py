"""Tests for jaxpost.sharding: meshes, rules, sharded forward/backward, batches, KV cache.

Runs on the 8 simulated CPU devices of tests/conftest.py.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpost import models, sharding
from jaxpost.sharding import DATA, FSDP, TENSOR

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# H = 4, K = 2, V = 64, D = 64, F = 128: divisible by every mesh axis above except K on tensor 4.
CONFIG = models.get_config("tiny")


def test_eight_devices():
    assert jax.device_count() == 8


# ---------------------------------------------------------------------------------------------
# Meshes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2,2,2", {DATA: 2, FSDP: 2, TENSOR: 2}),
        ("1, 8, 1", {DATA: 1, FSDP: 8, TENSOR: 1}),
        ("fsdp=4,tensor=2", {FSDP: 4, TENSOR: 2}),
        ("data=-1,tensor=4", {DATA: -1, TENSOR: 4}),
    ],
)
def test_parse_mesh_shape(text, expected):
    assert sharding.parse_mesh_shape(text) == expected


@pytest.mark.parametrize(
    "shape, sizes",
    [
        ((2, 2, 2), (2, 2, 2)),
        ("1,2,4", (1, 2, 4)),
        ({FSDP: 8}, (1, 8, 1)),
        ((-1, 2, 1), (4, 2, 1)),
        ("tensor=2,fsdp=-1", (1, 4, 2)),
    ],
)
def test_make_mesh(shape, sizes):
    mesh = sharding.make_mesh(shape)
    assert mesh.axis_names == sharding.MESH_AXES
    assert tuple(mesh.shape[a] for a in sharding.MESH_AXES) == sizes
    assert mesh.devices.size == 8


def test_make_mesh_on_a_subset_of_devices():
    mesh = sharding.make_mesh((1, 1, 2), devices=jax.devices()[:2])
    assert set(mesh.devices.flat) == set(jax.devices()[:2])


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 2, 1), r"has 4 devices but 8 are available"),
        ((4, 4, 1), r"has 16 devices but 8 are available"),
        ((-1, 3, 1), r"cannot fill -1, 8 devices are not a multiple of 3"),
        ((-1, -1, 2), r"at most one axis may be -1"),
        ((2, 4), r"one size per axis"),
        ({"pipeline": 8}, r"unknown mesh axis name\(s\) \['pipeline'\]"),
        ("data=2,pipe=4", r"unknown mesh axis name\(s\) \['pipe'\]"),
        ("2,x,2", r"sizes must be integers"),
        ("data=2,4", r"mixes positional and named"),
    ],
)
def test_bad_mesh_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(shape)


# ---------------------------------------------------------------------------------------------
# Rules


def test_every_model_logical_axis_has_a_rule_with_a_reason():
    names = {rule.logical for rule in sharding.DEFAULT_RULES}
    assert set(models.LOGICAL_AXES) <= names
    assert all(rule.why for rule in sharding.DEFAULT_RULES)


def test_divisibility_fallback_replicates_kv_heads_on_tensor_4():
    mesh = sharding.make_mesh((1, 2, 4))
    spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), mesh, shape=(64, 2, 16))
    assert spec == P(FSDP, None, None)
    # Query heads (4) still split four ways.
    spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), mesh, shape=(64, 4, 16))
    assert spec == P(FSDP, TENSOR, None)


def test_divisibility_fallback_keeps_the_axes_that_divide():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.logical_to_spec(("batch", "length"), mesh, shape=(8, 5)) == P(
        (DATA, FSDP), None
    )
    # 2 rows divide over data (2) but not data x fsdp (4): fsdp is dropped, data kept.
    assert sharding.logical_to_spec(("batch", "length"), mesh, shape=(2, 5)) == P(DATA, None)
    assert sharding.logical_to_spec(("batch",), mesh, shape=(1,)) == P(None)
    # Without a shape nothing is dropped.
    assert sharding.logical_to_spec(("batch", None), mesh) == P((DATA, FSDP), None)


def test_a_mesh_axis_is_used_once_per_spec():
    mesh = sharding.make_mesh((1, 2, 4))
    rules = (
        sharding.Rule("embed", (TENSOR,), "test"),
        sharding.Rule("mlp", (TENSOR, FSDP), "test"),
    )
    assert sharding.logical_to_spec(("embed", "mlp"), mesh, rules) == P(TENSOR, FSDP)
    assert sharding.logical_to_spec(("mlp", "embed"), mesh, rules) == P((TENSOR, FSDP), None)


def test_unknown_logical_axis_is_a_clear_error():
    mesh = sharding.make_mesh((1, 2, 4))
    with pytest.raises(ValueError, match=r"unknown logical axis 'experts'"):
        sharding.logical_to_spec(("embed", "experts"), mesh)
    rules = tuple(r for r in sharding.DEFAULT_RULES if r.logical != "mlp")
    with pytest.raises(ValueError, match=r"\['layers'\]\[0\]\['mlp'\].*unknown logical axis 'mlp'"):
        sharding.param_shardings(CONFIG, mesh, rules)


def test_bad_rules_are_clear_errors():
    mesh = sharding.make_mesh((1, 2, 4))
    with pytest.raises(ValueError, match=r"unknown mesh axis name\(s\) \['model'\]"):
        sharding.logical_to_spec(("mlp",), mesh, (sharding.Rule("mlp", ("model",), "x"),))
    twice = (sharding.Rule("mlp", None, "x"), sharding.Rule("mlp", (TENSOR,), "y"))
    with pytest.raises(ValueError, match=r"'mlp' twice"):
        sharding.logical_to_spec(("mlp",), mesh, twice)


def _expected_specs(mesh_shape, config):
    """The rules written out by hand for the tiny model, per parameter of layer 0."""
    _, f, t = mesh_shape
    kv = TENSOR if config.n_kv_heads % t == 0 else None
    return {
        "embed": P(TENSOR, FSDP),
        "lm_head": P(FSDP, TENSOR),
        "final_norm": P(FSDP),
        "q": P(FSDP, TENSOR, None),
        "k": P(FSDP, kv, None),
        "v": P(FSDP, kv, None),
        "o": P(TENSOR, None, FSDP),
        "q_bias": P(TENSOR, None),
        "k_bias": P(kv, None),
        "gate": P(FSDP, TENSOR),
        "up": P(FSDP, TENSOR),
        "down": P(TENSOR, FSDP),
    }


def _spec_tree(params):
    layer = params["layers"][0]
    out = {
        "embed": params["embed"],
        "final_norm": params["final_norm"]["scale"],
        **{k: layer["attn"][k] for k in ("q", "k", "v", "o", "q_bias", "k_bias")},
        **layer["mlp"],
    }
    if "lm_head" in params:
        out["lm_head"] = params["lm_head"]
    return out


def _shard_shape(shape, spec, mesh):
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        out.append(dim // int(np.prod([mesh.shape[a] for a in names])))
    return tuple(out)


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("tie", [True, False])
def test_param_shardings_follow_the_rules(mesh_shape, tie):
    config = CONFIG.replace(tie_embeddings=tie)
    mesh = sharding.make_mesh(mesh_shape)
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(config, mesh))
    expected = _expected_specs(mesh_shape, config)
    for name, spec in _spec_tree(specs).items():
        assert spec == expected[name], (mesh_shape, name)


# ---------------------------------------------------------------------------------------------
# Sharded forward and backward equal one device


def _loss(params, batch):
    """Mean token NLL of the next token over real positions, plus the logits."""
    logits = models.apply(CONFIG, params, batch["tokens"], batch["mask"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    weights = batch["mask"].astype(jnp.float32)
    return -jnp.sum(token_logp * weights) / jnp.sum(weights), logits


def _relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="module")
def reference():
    params = models.init(CONFIG, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(8, 16), dtype=np.int32)
    lengths = rng.integers(6, 17, size=(8,))
    mask = np.arange(16)[None, :] < lengths[:, None]
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "mask": mask}
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = jax.jit(jax.value_and_grad(_loss, has_aux=True))
    (loss, logits), grads = step(
        jax.device_put(params, one_device), jax.device_put(batch, one_device)
    )
    return params, batch, float(loss), np.asarray(logits), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize(
    "mesh_shape, under_mesh",
    [(m, False) for m in MESHES] + [((1, 8, 1), True), ((2, 2, 2), True)],
)
def test_sharded_forward_and_grad_equal_one_device(mesh_shape, under_mesh, reference):
    """With `under_mesh` the step is traced under `jax.set_mesh`, so the model's activation
    constraints are active (batch-split residual stream under FSDP): same numbers."""
    params, batch, ref_loss, ref_logits, ref_grads = reference
    mesh = sharding.make_mesh(mesh_shape)
    shardings = sharding.param_shardings(CONFIG, mesh)
    sharded_params = sharding.shard_params(params, shardings)
    sharded_batch = sharding.shard_batch(batch, mesh)

    # The parameters really live in shards of the expected shapes.
    for name, arr in _spec_tree(sharded_params).items():
        assert arr.sharding.spec == _expected_specs(mesh_shape, CONFIG)[name], name
    for arr in jax.tree.leaves(sharded_params):
        expected_shape = _shard_shape(arr.shape, arr.sharding.spec, mesh)
        assert len(arr.addressable_shards) == 8
        assert all(s.data.shape == expected_shape for s in arr.addressable_shards)
    assert sharded_batch["tokens"].sharding.spec == P((DATA, FSDP), None)

    logits_sharding = NamedSharding(
        mesh,
        sharding.logical_to_spec(("batch", "length", "vocab"), mesh, shape=ref_logits.shape),
    )
    batch_shardings = jax.tree.map(lambda x: x.sharding, sharded_batch)
    step = jax.jit(
        jax.value_and_grad(_loss, has_aux=True),
        in_shardings=(shardings, batch_shardings),
        out_shardings=((sharding.replicated(mesh), logits_sharding), shardings),
    )
    with jax.set_mesh(mesh) if under_mesh else contextlib.nullcontext():
        (loss, logits), grads = step(sharded_params, sharded_batch)

    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert _relative(logits, ref_logits) <= 1e-5
    flat_grads, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    for g, r, s in zip(flat_grads, flat_ref, jax.tree.leaves(shardings)):
        assert g.sharding.spec == s.spec
        assert _relative(g, r) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Activation constraints


def test_with_logical_constraint_is_the_identity_without_a_mesh():
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    axes = ("batch", "residual")
    assert sharding.with_logical_constraint(x, axes) is x
    with jax.set_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        assert sharding.with_logical_constraint(x, axes) is x
    # Someone else's mesh (no jaxpost axes): left alone rather than an error.
    other = jax.make_mesh((8,), ("x",), (jax.sharding.AxisType.Auto,))
    with jax.set_mesh(other):
        assert sharding.with_logical_constraint(x, axes) is x


def _hidden_sharding(mesh, batch_size):
    tokens = jax.ShapeDtypeStruct((batch_size, 16), jnp.int32)
    params = jax.eval_shape(lambda: models.init(CONFIG, 0))
    f = jax.jit(
        lambda p, t: models.hidden_states(CONFIG, p, t),
        in_shardings=(sharding.param_shardings(CONFIG, mesh), sharding.batch_sharding(mesh, 2)
                      if batch_size % sharding.data_parallel_size(mesh) == 0
                      else sharding.replicated(mesh)),
    )  # fmt: skip
    with jax.set_mesh(mesh):
        compiled = f.lower(params, tokens).compile()
    return compiled.output_shardings


@pytest.mark.parametrize(
    "mesh_shape, batch_size, spec",
    [
        ((1, 8, 1), 8, P((DATA, FSDP), None, None)),  # not the weights' P(None, None, FSDP)
        ((2, 2, 2), 8, P((DATA, FSDP), None, None)),  # whole over tensor (Megatron residual)
        ((2, 4, 1), 2, P(DATA, None, None)),  # 2 rows: fsdp does not divide, data does
    ],
)
def test_model_pins_the_residual_stream_to_the_batch_axes(mesh_shape, batch_size, spec):
    mesh = sharding.make_mesh(mesh_shape)
    got = _hidden_sharding(mesh, batch_size)
    # Equivalence, not spec equality: XLA drops size-1 axes from the specs it reports.
    assert got.is_equivalent_to(NamedSharding(mesh, spec), 3), got


def test_init_sharded_matches_init_and_is_sharded():
    mesh = sharding.make_mesh((1, 2, 4))
    params = sharding.init_sharded(CONFIG, mesh, seed=3)
    expected = sharding.param_shardings(CONFIG, mesh)
    jax.tree.map(
        lambda a, s: (a.sharding.spec == s.spec) or pytest.fail(str(a.sharding)), params, expected
    )
    chex.assert_trees_all_close(params, models.init(CONFIG, 3), atol=1e-6, rtol=1e-6)


def test_opt_state_shardings_mirror_the_params():
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.param_shardings(CONFIG, mesh)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    params = sharding.init_sharded(CONFIG, mesh)
    state_shapes = jax.eval_shape(optimizer.init, params)
    state_shardings = sharding.opt_state_shardings(optimizer, state_shapes, shardings)

    adam = state_shardings[1][0]
    for moments in (adam.mu, adam.nu):
        assert jax.tree.map(lambda s: s.spec, moments) == jax.tree.map(lambda s: s.spec, shardings)
    assert adam.count.spec == P()
    # The shardings are usable as they are: the state is created directly in its shards.
    state = jax.jit(optimizer.init, out_shardings=state_shardings)(params)
    assert state[1][0].mu["embed"].sharding.spec == P(TENSOR, FSDP)


def test_opt_state_shardings_for_factored_and_wrapped_optimizers():
    mesh = sharding.make_mesh((1, 2, 4))
    shardings = sharding.param_shardings(CONFIG, mesh)
    params = sharding.init_sharded(CONFIG, mesh)
    for optimizer in (optax.adafactor(1e-3), optax.MultiSteps(optax.adamw(1e-3), 4)):
        state_shapes = jax.eval_shape(optimizer.init, params)
        state_shardings = sharding.opt_state_shardings(optimizer, state_shapes, shardings)
        state = jax.jit(optimizer.init, out_shardings=state_shardings)(params)
        for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings)):
            assert leaf.sharding.spec == want.spec


# ---------------------------------------------------------------------------------------------
# Batches and the KV cache


def test_batch_sharding_and_shard_batch():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.batch_sharding(mesh, 3).spec == P((DATA, FSDP), None, None)
    assert sharding.data_parallel_size(mesh) == 4
    batch = sharding.shard_batch({"tokens": np.zeros((8, 4), np.int32)}, mesh)
    assert batch["tokens"].addressable_shards[0].data.shape == (2, 4)


@pytest.mark.parametrize("mesh_shape, size", [((2, 2, 2), 6), ((1, 8, 1), 4), ((8, 1, 1), 12)])
def test_batch_not_divisible_is_a_clear_error(mesh_shape, size):
    mesh = sharding.make_mesh(mesh_shape)
    dp = mesh_shape[0] * mesh_shape[1]
    with pytest.raises(
        ValueError, match=rf"batch size {size} of \['tokens'\] is not divisible by {dp}"
    ):
        sharding.shard_batch({"tokens": np.zeros((size, 3), np.int32)}, mesh)
    with pytest.raises(ValueError, match=r"not divisible"):
        sharding.global_batch_from_local({"tokens": np.zeros((size, 3), np.int32)}, mesh)


def test_scalar_batch_leaf_is_an_error():
    mesh = sharding.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match=r"\['step'\] is a scalar"):
        sharding.shard_batch({"step": np.int32(3)}, mesh)


def test_global_batch_from_local_with_one_process():
    mesh = sharding.make_mesh((2, 2, 2))
    local = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    global_batch = sharding.global_batch_from_local(local, mesh)
    assert global_batch["tokens"].shape == (8, 3)
    assert global_batch["tokens"].sharding.spec == P((DATA, FSDP), None)
    np.testing.assert_array_equal(np.asarray(global_batch["tokens"]), local["tokens"])


@pytest.mark.parametrize(
    "mesh_shape, batch, kv_spec",
    [
        ((2, 2, 2), 4, P((DATA, FSDP), TENSOR, None, None)),
        ((1, 2, 4), 4, P((DATA, FSDP), None, None, None)),  # K = 2 does not split over 4
        ((2, 2, 2), 1, P(None, TENSOR, None, None)),  # a single prompt is replicated
    ],
)
def test_cache_shardings(mesh_shape, batch, kv_spec):
    mesh = sharding.make_mesh(mesh_shape)
    shardings = sharding.cache_shardings(CONFIG, mesh, batch, capacity=32)
    assert len(shardings.k) == CONFIG.n_layers and len(shardings.v) == CONFIG.n_layers
    assert all(s.spec == kv_spec for s in shardings.k + shardings.v)
    assert shardings.valid_BxS.spec == P(kv_spec[0], None)
    cache = jax.device_put(models.init_cache(CONFIG, batch, 32), shardings)
    assert cache.k[0].sharding.spec == kv_spec
