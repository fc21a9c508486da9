"""Logical-axis partition rules: which mesh axes split each named dimension.

This module imports only jax (and jaxpost's error type), so the model can pin its activations'
layouts without importing `jaxpost.sharding` (which imports the model to build parameter
shardings). `jaxpost.sharding` re-exports everything here.

Mesh axes (one mesh serves every run):

    data    pure data parallelism: a full copy of the (tensor-sharded) weights per group
    fsdp    data parallelism whose groups also split every weight's residual (embed) dim
    tensor  Megatron-style tensor parallelism over heads, MLP width and vocabulary
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
from jax.sharding import PartitionSpec

from jaxpost.errors import UserError

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)


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
    Rule("layers", None, "the scan over the stacked blocks slices one layer per step on every "
         "device; splitting it would be pipeline parallelism"),
    # Activations and decode state.
    Rule("batch", (DATA, FSDP), "examples are independent: both data-parallel axes split them"),
    Rule("residual", None, "activations' width: whole, since fsdp splits their batch instead"),
    Rule("length", None, "attention mixes positions: no sequence parallelism"),
    Rule("cache_length", None, "decode writes one slot at a time anywhere in the cache"),
)  # fmt: skip


def check_axis_names(names) -> None:
    """Raise for a mesh axis name that is not one of `MESH_AXES`."""
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown:
        raise UserError(f"unknown mesh axis name(s) {unknown}; the mesh axes are {MESH_AXES}")


def rule_table(rules: Sequence[Rule]) -> dict[str, tuple[str, ...]]:
    """Logical name -> tuple of mesh axes (empty: replicated); refuses a name given twice."""
    table = {}
    for rule in rules:
        logical, mesh_axes = rule[0], rule[1]
        if logical in table:
            raise UserError(f"sharding rules name logical axis {logical!r} twice")
        if mesh_axes is None:
            axes = ()
        elif isinstance(mesh_axes, str):
            axes = (mesh_axes,)
        else:
            axes = tuple(mesh_axes)
        check_axis_names(axes)
        table[logical] = axes
    return table


def logical_to_spec(
    logical_axes: Sequence[str | None],
    mesh,
    rules: Sequence[Rule] = DEFAULT_RULES,
    *,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """The PartitionSpec of an array whose dims carry `logical_axes` (None: replicated dim).

    `mesh` is a `Mesh` or an `AbstractMesh`. Each dim takes the mesh axes its rule names, in
    order, skipping an axis when
      - the dim's size (if `shape` is given) is not divisible by the product of the axes kept
        so far times that axis's size: e.g. kv_heads = 2 on tensor = 4 is replicated, since
        jax refuses to place an array in uneven shards, and padding two heads to four shards
        would waste half the devices' work anyway;
      - an earlier dim of the same array already uses it (a mesh axis can split one dim only).
    A logical name missing from the rules is an error, raised before anything is compiled.
    """
    table = rule_table(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise UserError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise UserError(
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
