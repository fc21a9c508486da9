"""Device meshes and logical-axis partition rules.

One mesh with three named axes serves every run, on one CPU or a pod:

    data    pure data parallelism: a full copy of the (tensor-sharded) weights per group
    fsdp    data parallelism whose groups also split every weight's residual (embed) dim
    tensor  Megatron-style tensor parallelism over heads, MLP width and vocabulary

Parameters carry logical axis names (`jaxpost.models.logical_axes`); `DEFAULT_RULES` maps each
logical name to mesh axes, and shardings are computed from shapes alone (`jax.eval_shape`), so
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
from typing import NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpost import models
from jaxpost.models.configs import ModelConfig

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# ---------------------------------------------------------------------------------------------
# Meshes


def parse_mesh_shape(text: str) -> dict[str, int]:
    """Parse a mesh flag: positional "2,2,2" (data, fsdp, tensor) or named "fsdp=4,tensor=2".

    Named axes that are left out have size 1; at most one size may be -1 (fill the rest).
    """
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"empty mesh shape {text!r}; expected e.g. '2,2,2' or 'fsdp=4,tensor=2'")
    named = ["=" in s for s in items]
    if any(named) and not all(named):
        raise ValueError(f"mesh shape {text!r} mixes positional and named sizes")
    try:
        if all(named):
            pairs = [s.split("=", 1) for s in items]
            sizes = {k.strip(): int(v) for k, v in pairs}
            if len(sizes) != len(pairs):
                raise ValueError(f"mesh shape {text!r} names an axis twice")
        else:
            if len(items) != len(MESH_AXES):
                raise ValueError(
                    f"positional mesh shape {text!r} needs {len(MESH_AXES)} sizes {MESH_AXES}"
                )
            sizes = dict(zip(MESH_AXES, (int(s) for s in items)))
    except ValueError as e:
        if "mesh shape" in str(e):
            raise
        raise ValueError(f"mesh shape {text!r}: sizes must be integers") from e
    _check_axis_names(sizes)
    return sizes


def _check_axis_names(names) -> None:
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown:
        raise ValueError(f"unknown mesh axis name(s) {unknown}; the mesh axes are {MESH_AXES}")


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
            raise ValueError(f"mesh shape {tuple(shape)} must have one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(sizes)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape {tuple(sizes)}: sizes must be positive (or one -1)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh shape {tuple(sizes)}: cannot fill -1, {num_devices} devices are not a "
                f"multiple of {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
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
# Rules


class Rule(NamedTuple):
    """Logical axis -> mesh axes (None: replicated), with the reason it is sharded so."""

    logical: str
    mesh_axes: tuple[str, ...] | None
    why: str


DEFAULT_RULES: tuple[Rule, ...] = (
    # Parameters.
    Rule("vocab", (TENSOR,), "embedding/LM head split by vocabulary: the largest matrices"),
    Rule("embed", (FSDP,), "FSDP splits every weight's residual dim; gathered just before use"),
    Rule("heads", (TENSOR,), "attention is independent per head: no communication inside it"),
    Rule("kv_heads", (TENSOR,), "k/v follow their query groups; replicated when K < tensor"),
    Rule("head_dim", None, "contracted inside each head; splitting it all-reduces every score"),
    Rule("mlp", (TENSOR,), "gate/up columns and down rows split: one all-reduce per MLP"),
    Rule("layers", None, "layers run in sequence; no pipeline parallelism"),
    # Activations and decode state.
    Rule("batch", (DATA, FSDP), "examples are independent: both data-parallel axes split them"),
    Rule("residual", None, "activations' width: whole, since fsdp splits their batch instead"),
    Rule("length", None, "attention mixes positions: no sequence parallelism"),
    Rule("cache_length", None, "decode writes one slot at a time anywhere in the cache"),
)  # fmt: skip


def _rule_table(rules: Sequence[Rule]) -> dict[str, tuple[str, ...]]:
    table = {}
    for rule in rules:
        logical, mesh_axes = rule[0], rule[1]
        if logical in table:
            raise ValueError(f"sharding rules name logical axis {logical!r} twice")
        if mesh_axes is None:
            axes = ()
        elif isinstance(mesh_axes, str):
            axes = (mesh_axes,)
        else:
            axes = tuple(mesh_axes)
        _check_axis_names(axes)
        table[logical] = axes
    return table


def logical_to_spec(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Sequence[Rule] = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """The PartitionSpec of an array whose dims carry `logical_axes` (None: replicated dim).

    Each dim takes the mesh axes its rule names, in order, skipping an axis when
      - the dim's size (if `shape` is given) is not divisible by the product of the axes kept
        so far times that axis's size: e.g. kv_heads = 2 on tensor = 4 is replicated, since
        jax refuses to place an array in uneven shards, and padding two heads to four shards
        would waste half the devices' work anyway;
      - an earlier dim of the same array already uses it (a mesh axis can split one dim only).
    A logical name missing from the rules is an error, raised before anything is compiled.
    """
    table = _rule_table(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"unknown logical axis {name!r} (in {tuple(logical_axes)}); the sharding rules "
                f"know {sorted(table)}"
            )
        kept: list[str] = []
        for axis in table[name]:
            size = mesh.shape[axis]
            if axis in used:
                continue
            if shape is not None and shape[i] % (math.prod(mesh.shape[a] for a in kept) * size):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def shardings_from_logical(abstract_tree, axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of shapes (`jax.ShapeDtypeStruct`s or arrays) whose leaves
    carry the logical axis tuples of the matching `axes_tree` leaves."""

    def one(path, leaf, axes):
        try:
            spec = logical_to_spec(axes, mesh, rules, shape=leaf.shape)
        except ValueError as e:
            raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from None
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, abstract_tree, axes_tree)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None],
                            rules: Sequence[Rule] = DEFAULT_RULES) -> jax.Array:  # fmt: skip
    """Constrain an activation inside a traced program to the rules' sharding of `logical_axes`,
    on the mesh set by `jax.set_mesh(mesh)`; without one (or on one device) return `x` as is.

    Why the model needs it: under FSDP a weight's embed dim and the batch are split over the same
    fsdp axis, and XLA's propagation, left alone, lets the weights' layout win, so every device
    would hold full-batch activations. The constraint pins the residual stream to batch-split
    (data x fsdp); the weights are then all-gathered just before use, as FSDP intends. Dims that
    do not divide stay whole (`logical_to_spec` with the shape), and a mesh without the jaxpost
    axes (someone else's) is left alone. Only the layout changes; values agree up to the order
    of floating-point reductions.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = logical_to_spec(logical_axes, mesh, rules, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------------------------
# Parameters and optimizer state


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
        raise ValueError("a batch array needs a leading batch dim; got a scalar")
    axes = _batch_axes(rules)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def _check_batch_dim(path, size: int, divisor: int, mesh: Mesh, rules, what: str) -> None:
    if size % divisor:
        axes = " x ".join(f"{a} {mesh.shape[a]}" for a in _batch_axes(rules))
        raise ValueError(
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
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar")
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
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)} is a scalar")
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

    Keys and values [B, K, S, E] split the batch over data x fsdp and the kv heads over tensor,
    each only where it divides (a single prompt, or K < tensor size, stays replicated on that
    dim); slots and head_dim are whole on every device.
    """
    capacity = config.max_seq_len if capacity is None else capacity
    kv_shape = (batch, config.n_kv_heads, capacity, config.head_dim)
    kv_axes = ("batch", "kv_heads", "cache_length", "head_dim")
    kv = NamedSharding(mesh, logical_to_spec(kv_axes, mesh, rules, shape=kv_shape))
    valid = NamedSharding(
        mesh, logical_to_spec(("batch", "cache_length"), mesh, rules, shape=(batch, capacity))
    )
    layers = (kv,) * config.n_layers
    return models.KVCache(k=layers, v=layers, valid_BxS=valid)
