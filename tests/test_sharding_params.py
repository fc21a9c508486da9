"""jaxpost.sharding with the model: parameter shardings from the rules, sharded forward and
backward equal to one device, the model's activation constraints, optimizer-state shardings.

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


def _expected_specs(mesh_shape, config):
    """The rules written out by hand for the tiny model; the blocks' stacked parameters lead
    with the layer axis, which is never split."""
    _, f, t = mesh_shape
    kv = TENSOR if config.n_kv_heads % t == 0 else None
    return {
        "embed": P(TENSOR, FSDP),
        "lm_head": P(FSDP, TENSOR),
        "final_norm": P(FSDP),
        "q": P(None, FSDP, TENSOR, None),
        "k": P(None, FSDP, kv, None),
        "v": P(None, FSDP, kv, None),
        "o": P(None, TENSOR, None, FSDP),
        "q_bias": P(None, TENSOR, None),
        "k_bias": P(None, kv, None),
        "attn_norm": P(None, FSDP),
        "gate": P(None, FSDP, TENSOR),
        "up": P(None, FSDP, TENSOR),
        "down": P(None, TENSOR, FSDP),
    }


def _spec_tree(params):
    layers = params["layers"]
    out = {
        "embed": params["embed"],
        "final_norm": params["final_norm"]["scale"],
        "attn_norm": layers["attn_norm"]["scale"],
        **{k: layers["attn"][k] for k in ("q", "k", "v", "o", "q_bias", "k_bias")},
        **layers["mlp"],
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
