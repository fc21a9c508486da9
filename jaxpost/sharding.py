"""Device meshes and logical-axis partition rules.

One mesh with three named axes serves every run, on one CPU or a pod:

    data    pure data parallelism: a full copy of the (tensor-sharded) weights per group
    fsdp    data parallelism whose groups also split every weight's residual (embed) dim
    tensor  Megatron-style tensor parallelism over heads, MLP width and vocabulary

Parameters carry logical axis names (`jaxpost.models.logical_axes`); `DEFAULT_RULES` maps each
logical name to mesh axes (the rules and `with_logical_constraint` live in
`jaxpost.models.partitioning`, which the model imports without importing this module; they are
re-exported here), and shardings are computed from shapes alone (`jax.eval_shape`), so
a model can be initialized directly into its shards:

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    params = init_sharded(config, mesh, seed=0)          # never materialized on one device
    batch = shard_batch({"tokens": tokens_BxL}, mesh)    # dim 0 over data x fsdp
    with jax.set_mesh(mesh):                             # trace under the mesh, so the model
        out = jitted_step(state, batch)                  # pins its activations (see below)

Activations are constrained by logical names too (`with_logical_constraint`), but only when the
program is traced under `jax.set_mesh(mesh)`: the model code has no other way to see the mesh.
Without it XLA lets FSDP weights decide the activations' layout, which under FSDP means
full-batch activations on every device (about 2x the memory of the tiny model's step on 1,8,1).

Multi-host runs start JAX's multi-controller runtime first, with
`jaxpost.distributed.maybe_initialize_distributed()`; everything here then works unchanged on
the global device set (per-host data loading: `global_batch_from_local`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpost import models
from jaxpost.errors import UserError
from jaxpost.models.configs import ModelConfig

# The rules live beside the model (which imports them, never this module); re-exported here.
from jaxpost.models.partitioning import (  # noqa: F401
    DATA,
    DEFAULT_RULES,
    FSDP,
    MESH_AXES,
    TENSOR,
    Rule,
    logical_to_spec,
    with_logical_constraint,
)
from jaxpost.models.partitioning import check_axis_names as _check_axis_names
from jaxpost.models.partitioning import rule_table as _rule_table

# ---------------------------------------------------------------------------------------------
# Meshes


def parse_mesh_shape(text: str) -> dict[str, int]:
    """Parse a mesh flag: positional "2,2,2" (data, fsdp, tensor) or named "fsdp=4,tensor=2".

    Named axes that are left out have size 1; at most one size may be -1 (fill the rest).
    """
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UserError(f"empty mesh shape {text!r}; expected e.g. '2,2,2' or 'fsdp=4,tensor=2'")
    named = ["=" in s for s in items]
    if any(named) and not all(named):
        raise UserError(f"mesh shape {text!r} mixes positional and named sizes")
    try:
        if all(named):
            pairs = [s.split("=", 1) for s in items]
            sizes = {k.strip(): int(v) for k, v in pairs}
            if len(sizes) != len(pairs):
                raise UserError(f"mesh shape {text!r} names an axis twice")
        else:
            if len(items) != len(MESH_AXES):
                raise UserError(
                    f"positional mesh shape {text!r} needs {len(MESH_AXES)} sizes {MESH_AXES}"
                )
            sizes = dict(zip(MESH_AXES, (int(s) for s in items)))
    except ValueError as e:
        if "mesh shape" in str(e):
            raise
        raise UserError(f"mesh shape {text!r}: sizes must be integers") from e
    _check_axis_names(sizes)
    return sizes


def _mesh_sizes(shape, num_devices: int) -> tuple[int, int, int]:
    """Resolve a shape (tuple, dict or string) against the device count, filling one -1."""
    if isinstance(shape, str):
        shape = parse_mesh_shape(shape)
    if isinstance(shape, Mapping):
        _check_axis_names(shape)
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise UserError(f"mesh shape {tuple(shape)} must have one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise UserError(f"mesh shape {tuple(sizes)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh shape {tuple(sizes)}: sizes must be positive (or one -1)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise UserError(
                f"mesh shape {tuple(sizes)}: cannot fill -1, {num_devices} devices are not a "
                f"multiple of {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
            f"{num_devices} are available; the sizes must multiply to the device count"
        )
    return tuple(sizes)


def make_mesh(shape, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    `shape` is a 3-tuple, a dict keyed by axis name (missing axes are 1) or a string for
    `parse_mesh_shape`; one size may be -1. Axis types are `Auto`: the model's plain jnp code
    lets XLA propagate shardings from the inputs rather than declaring them per op.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = _mesh_sizes(shape, len(devices))
    return jax.make_mesh(sizes, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------------
# Parameters and optimizer state


def shardings_from_logical(abstract_tree, axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of shapes (`jax.ShapeDtypeStruct`s or arrays) whose leaves
    carry the logical axis tuples of the matching `axes_tree` leaves."""

    def one(path, leaf, axes):
        try:
            spec = logical_to_spec(axes, mesh, rules, shape=leaf.shape)
        except ValueError as e:
            raise UserError(f"{jax.tree_util.keystr(path)}: {e}") from None
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_tree, axes_tree)


def param_shardings(config: ModelConfig, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES):
    """A tree of NamedShardings matching `models.init(config)`, from shapes and logical axes."""
    return shardings_from_logical(
        models.abstract_params(config), models.logical_axes(config), mesh, rules
    )


def shard_params(params, shardings):
    """Place an existing parameter tree onto its shardings (e.g. after loading a checkpoint)."""
    return jax.device_put(params, shardings)


def init_sharded(
    config: ModelConfig, mesh: Mesh, seed: int = 0, rules: Sequence[Rule] = DEFAULT_RULES
):
    """`models.init(config, seed)`, computed by a jitted program that writes each device's
    shard directly, so no device ever holds the whole model. The same random draws as
    `models.init` (equal up to float rounding of the initializers)."""
    shardings = param_shardings(config, mesh, rules)
    init_fn = jax.jit(lambda key: models.init(config, key), out_shardings=shardings)
    return init_fn(jax.random.key(seed))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device (scalars, step counters, rng keys)."""
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(
    optimizer: optax.GradientTransformation, opt_state_shapes, params_shardings
):
    """Shardings for an optax state, given `jax.eval_shape(optimizer.init, params)`.

    optax states hold copies of the parameter tree (Adam's mu and nu, ...) next to small
    bookkeeping leaves (step counts). `optax.tree_map_params` finds the param-shaped subtrees
    structurally, by initializing the optimizer on a placeholder: those take the parameters'
    shardings, and every other leaf is replicated. A param-shaped leaf whose shape differs from
    its parameter so that the parameter's spec cannot split it evenly (e.g. adafactor's
    factored moments) is replicated too. Any choice is numerically correct; this one keeps each
    moment next to its parameter's shard, so the update needs no communication.
    """
    mesh = jax.tree.leaves(params_shardings)[0].mesh
    return optax.tree_map_params(
        optimizer,
        lambda leaf, sharding: _param_like(leaf, sharding, mesh),
        opt_state_shapes,
        params_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def _param_like(leaf, sharding: NamedSharding, mesh: Mesh) -> NamedSharding:
    """The parameter's sharding if it can shard `leaf` evenly, else replicated."""
    spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
    if len(spec) != len(leaf.shape):
        return replicated(mesh)
    for dim, axes in zip(leaf.shape, spec):
        names = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if dim % math.prod(mesh.shape[a] for a in names):
            return replicated(mesh)
    return sharding


# ---------------------------------------------------------------------------------------------
# Batches and the KV cache


def _batch_axes(rules: Sequence[Rule]) -> tuple[str, ...]:
    return _rule_table(rules).get("batch", ())


def data_parallel_size(mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> int:
    """How many ways the batch is split: the product of the mesh axes of the "batch" rule."""
    return math.prod(mesh.shape[a] for a in _batch_axes(rules))


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence[Rule] = DEFAULT_RULES) -> NamedSharding:
    """Dim 0 split over the batch axes (data, fsdp), the other `ndim - 1` dims replicated."""
    if ndim < 1:
        raise UserError("a batch array needs a leading batch dim; got a scalar")
    axes = _batch_axes(rules)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def _check_batch_dim(path, size: int, divisor: int, mesh: Mesh, rules, what: str) -> None:
    if size % divisor:
        axes = " x ".join(f"{a} {mesh.shape[a]}" for a in _batch_axes(rules))
        raise UserError(
            f"{what} {size} of {jax.tree_util.keystr(path) or 'the batch'} is not divisible by "
            f"{divisor} (data-parallel size {data_parallel_size(mesh, rules)} = {axes})"
        )


def shard_batch(batch, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES):
    """Place a global batch (a tree of arrays with a common leading batch dim) on the mesh.

    Every process passes the same global values; with per-host data loading use
    `global_batch_from_local` instead. Raises if the batch size does not divide evenly.
    """
    dp = data_parallel_size(mesh, rules)

    def one(path, x):
        if np.ndim(x) < 1:
            raise UserError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar")
        _check_batch_dim(path, np.shape(x)[0], dp, mesh, rules, "batch size")
        return jax.device_put(x, batch_sharding(mesh, np.ndim(x), rules))

    return jax.tree_util.tree_map_with_path(one, batch)


def _local_batch_shards(mesh: Mesh, rules: Sequence[Rule]) -> int:
    """How many distinct batch slices this process's devices hold."""
    axes = _batch_axes(rules)
    coords = set()
    process = jax.process_index()
    for index, device in np.ndenumerate(mesh.devices):
        if device.process_index == process:
            coords.add(tuple(index[mesh.axis_names.index(a)] for a in axes))
    return len(coords)


def global_batch_from_local(local_batch, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES):
    """Assemble global arrays from each process's own slice of the batch.

    Each host loads only the examples its devices will hold (its consecutive block of the batch
    in process order, `local_batch_size = global / process_count` in the usual layout) and
    `jax.make_array_from_process_local_data` stitches the global array without any transfer.
    With one process this is `shard_batch`.
    """
    shards = _local_batch_shards(mesh, rules)

    def one(path, x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise UserError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar")
        _check_batch_dim(path, x.shape[0], shards, mesh, rules, "local batch size")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)

    return jax.tree_util.tree_map_with_path(one, local_batch)


def cache_shardings(
    config: ModelConfig,
    mesh: Mesh,
    batch: int,
    capacity: int | None = None,
    rules: Sequence[Rule] = DEFAULT_RULES,
) -> models.KVCache:
    """Shardings for `models.init_cache(config, batch, capacity)`, as a `KVCache` of them.

    Keys [B, K, E, S] and values [B, K, S, E] (one buffer per layer) split the batch over
    data x fsdp and the kv heads over tensor, each only where it divides (a single prompt, or
    K < tensor size, stays replicated on that dim); slots and head_dim are whole on every device.
    """
    capacity = config.max_seq_len if capacity is None else capacity
    k_shape, v_shape = models.cache_shapes(config, batch, capacity)
    k = NamedSharding(mesh, logical_to_spec(("batch", "kv_heads", "head_dim", "cache_length"),
                                            mesh, rules, shape=k_shape))  # fmt: skip
    v = NamedSharding(mesh, logical_to_spec(("batch", "kv_heads", "cache_length", "head_dim"),
                                            mesh, rules, shape=v_shape))  # fmt: skip
    valid = NamedSharding(
        mesh, logical_to_spec(("batch", "cache_length"), mesh, rules, shape=(batch, capacity))
    )
    return models.KVCache(k=(k,) * config.n_layers, v=(v,) * config.n_layers, valid_BxS=valid)
