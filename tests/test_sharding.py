"""Tests for jaxpost.sharding: meshes, rules, batches, the KV cache (parameters, sharded steps
and activation constraints: tests/test_sharding_params.py).

Runs on the 8 simulated CPU devices of tests/conftest.py.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxpost import models, sharding
from jaxpost.sharding import DATA, FSDP, TENSOR

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
    # The stacked blocks' layer axis is never split: each device runs every layer.
    layers = next(r for r in sharding.DEFAULT_RULES if r.logical == "layers")
    assert layers.mesh_axes is None


def test_the_rules_live_beside_the_model_and_sharding_re_exports_them():
    from jaxpost.models import partitioning

    assert sharding.DEFAULT_RULES is partitioning.DEFAULT_RULES
    assert sharding.logical_to_spec is partitioning.logical_to_spec
    assert sharding.with_logical_constraint is partitioning.with_logical_constraint
    assert sharding.Rule is partitioning.Rule


def test_the_model_package_never_imports_sharding():
    """jaxpost.sharding imports the model; the model imports only its partitioning rules (no
    cycle). Checked on the source, so a lazy import inside a function is caught too."""
    import ast
    from pathlib import Path

    package = Path(models.__file__).parent
    for source in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith(("jaxpost.sharding", "jaxpost.plan",
                                                     "jaxpost.train"))]  # fmt: skip
            assert not bad, (source.name, bad)


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
    with pytest.raises(
        ValueError, match=r"\['layers'\]\['mlp'\]\['down'\].*unknown logical axis 'mlp'"
    ):
        sharding.param_shardings(CONFIG, mesh, rules)


def test_bad_rules_are_clear_errors():
    mesh = sharding.make_mesh((1, 2, 4))
    with pytest.raises(ValueError, match=r"unknown mesh axis name\(s\) \['model'\]"):
        sharding.logical_to_spec(("mlp",), mesh, (sharding.Rule("mlp", ("model",), "x"),))
    twice = (sharding.Rule("mlp", None, "x"), sharding.Rule("mlp", (TENSOR,), "y"))
    with pytest.raises(ValueError, match=r"'mlp' twice"):
        sharding.logical_to_spec(("mlp",), mesh, twice)


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
