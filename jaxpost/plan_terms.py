"""The memory model behind `jaxpost.plan`: the `Plan` record, shard sizes from shapes and
rules, and what the layers of the train step hold as the compiled program holds them (the
objective's share, loss and frozen models, is `jaxpost.plan_step`'s).

Everything here is per device and computed from shapes only (`jax.eval_shape`, an
`AbstractMesh`): nothing is allocated or compiled. The activation formulas are read off the
model's code (what `jax.vjp` of one block saves, per remat policy) and off XLA's buffer
assignment of the jitted steps (which of those buffers are live at once); `jaxpost.plan`'s
docstring states them and tests/test_plan.py and tests/test_plan_steps.py check their sum
against `compiled.memory_analysis()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from jaxpost import sharding
from jaxpost.errors import UserError
from jaxpost.models import ModelConfig

PLATFORMS = ("cpu", "gpu", "tpu")

GiB = 1024**3
PERSISTENT = ("params", "optimizer", "teacher", "reference", "adapters")
SAMPLING = ("kv_cache", "decode_weights")
# The train step's inputs (the rest of its terms are XLA's temporaries): the state, the batch
# and the frozen models' parameters.
ARGUMENTS = ("params", "optimizer", "batch", "teacher", "reference", "adapters")
TEMPORARIES = ("gradients", "gathered_weights", "weight_copies", "activations", "backward_peak",
               "frozen_forward", "update", "merged_weights")  # fmt: skip

# The knob that shrinks each term, for the "does not fit" message.
_KNOBS = {
    "params": "shard the weights over more devices (a larger fsdp axis), or bfloat16 params",
    "optimizer": "shard the optimizer state over more devices (a larger fsdp axis)",
    "gradients": "shard over more devices (a larger fsdp axis), or bfloat16 params",
    "gathered_weights": "more tensor parallelism (fsdp gathers one block at a time)",
    "weight_copies": "a larger fsdp axis, or the same compute and param dtype",
    "activations": 'remat="full", a smaller per-device batch (or grad_accum), or a shorter seq_len',
    "backward_peak": "a smaller per-device batch (or grad_accum), shorter sequences, or more "
    "tensor parallelism (heads and vocabulary split)",
    "batch": "a smaller per-device batch",
    "teacher": "shard the teacher over more devices (fsdp/tensor), or a bfloat16 teacher",
    "reference": "shard the reference over more devices (fsdp/tensor), or a bfloat16 reference",
    "kv_cache": "a smaller sample_batch, or more data/tensor parallelism for sampling",
    "decode_weights": "shard the weights over more devices (fsdp/tensor)",
    "frozen_forward": "shard the frozen model over more devices (fsdp/tensor), a bfloat16-native "
    "platform (XLA:CPU converts bfloat16 weights to float32), or a smaller per-device batch",
    "update": "shard the parameters and optimizer state over more devices (a larger fsdp axis)",
    "adapters": "a smaller lora_rank",
    "merged_weights": "shard the weights over more devices (a larger fsdp axis), or bfloat16 "
    "params",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory estimate. `terms` maps each term to bytes; see the module docstring."""

    terms: dict[str, int]
    total: int
    device_memory_bytes: int | None
    mesh: dict[str, int]
    notes: tuple[str, ...] = ()
    objective: str = "sft"
    loss_impl: str = "materialized"
    knobs: dict[str, str] = dataclasses.field(default_factory=dict)  # overrides of _KNOBS

    @property
    def train_step_bytes(self) -> int:
        """The train step alone: its arguments (state, batch, frozen models) and temporaries,
        not the sampler's cache."""
        return sum(v for k, v in self.terms.items() if k not in SAMPLING)

    @property
    def temp_bytes(self) -> int:
        """The train step's temporaries (what XLA's `memory_analysis().temp_size_in_bytes`
        reports): the train step less its arguments (parameters, optimizer state, batch, the
        teacher's or reference's parameters)."""
        return self.train_step_bytes - sum(self.terms.get(k, 0) for k in ARGUMENTS)

    @property
    def biggest(self) -> str:
        return max(self.terms, key=self.terms.get)

    @property
    def fits(self) -> bool:
        return self.device_memory_bytes is None or self.total <= self.device_memory_bytes

    @property
    def message(self) -> str:
        """Why it does not fit and what helps (empty when it fits)."""
        if self.fits:
            return ""
        big = self.biggest
        return (
            f"plan does not fit: {_gib(self.total)} per device > {_gib(self.device_memory_bytes)}"
            f" of device memory; the biggest term is {big} ({_gib(self.terms[big])}); "
            f"what helps: {self.knobs.get(big, _KNOBS[big])}"
        )

    def table(self) -> str:
        """A fixed-width table of the terms, largest first, then the total."""
        rows = sorted(self.terms.items(), key=lambda kv: -kv[1])
        lines = [f"{'term':<17}{'bytes/device':>16}{'GiB':>10}  phase"]
        for name, value in rows:
            phase = "persistent" if name in PERSISTENT else "sampling" if name in SAMPLING \
                else "train step"  # fmt: skip
            lines.append(f"{name:<17}{value:>16,d}{value / GiB:>10.3f}  {phase}")
        lines.append(f"{'total':<17}{self.total:>16,d}{self.total / GiB:>10.3f}")
        if self.device_memory_bytes is not None:
            lines.append(f"{'device memory':<17}{self.device_memory_bytes:>16,d}"
                         f"{self.device_memory_bytes / GiB:>10.3f}  fits: {self.fits}")  # fmt: skip
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_json(self) -> str:
        return json.dumps({"objective": self.objective, "loss_impl": self.loss_impl,
                           "mesh": self.mesh, "terms": self.terms, "total": self.total,
                           "temp_bytes": self.temp_bytes,
                           "device_memory_bytes": self.device_memory_bytes, "fits": self.fits,
                           "biggest": self.biggest})  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def check_fits(p: Plan) -> Plan:
    """Raise `MemoryError` with `p.message` when the plan does not fit; return it otherwise."""
    if not p.fits:
        raise MemoryError(p.message)
    return p


def abstract_mesh(mesh_shape, devices: int | None = None) -> AbstractMesh:
    """A (data, fsdp, tensor) `AbstractMesh`: sizes without devices, so any pod can be planned.

    `mesh_shape` is anything `sharding.make_mesh` takes. `devices` defaults to the product of
    the sizes (then no size may be -1); when given, the sizes must multiply to it.
    """
    if devices is None:
        sizes = _raw_sizes(mesh_shape)
        if -1 in sizes:
            raise UserError(f"mesh shape {mesh_shape!r} has a -1: pass the device count")
        devices = math.prod(sizes)
    if devices < 1:
        raise UserError(f"device count must be >= 1, got {devices}")
    sizes = sharding._mesh_sizes(mesh_shape, devices)
    return AbstractMesh(sizes, sharding.MESH_AXES)


def _raw_sizes(mesh_shape) -> list[int]:
    if isinstance(mesh_shape, str):
        mesh_shape = sharding.parse_mesh_shape(mesh_shape)
    if isinstance(mesh_shape, Mapping):
        sharding._check_axis_names(mesh_shape)
        return [int(mesh_shape.get(a, 1)) for a in sharding.MESH_AXES]
    return [int(s) for s in mesh_shape]


def _shardings(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def tree_bytes(abstract_tree, shardings_tree) -> int:
    """Σ of shard bytes: prod(shard shape) · itemsize for each leaf."""
    return sum(
        math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x, s in zip(jax.tree.leaves(abstract_tree), _shardings(shardings_tree), strict=True)
    )


def shard_elements(abstract_tree, shardings_tree) -> int:
    """Σ of shard element counts (the parameters a device holds)."""
    return sum(
        math.prod(s.shard_shape(x.shape))
        for x, s in zip(jax.tree.leaves(abstract_tree), _shardings(shardings_tree), strict=True)
    )


def fsdp_gathered(abstract_params, param_shardings, config: ModelConfig,
                  all_layers: bool) -> tuple[int, int]:  # fmt: skip
    """(elements, bytes) per device of the fsdp-split weights once all-gathered over fsdp,
    minus the elements of their own shards for the first (so `P_local + elements` is what the
    matmuls see), counting the non-block weights plus one block's (the stacked blocks' bytes
    divided by the layer count: the scan gathers a layer's weights in its step, forward and
    backward) or, with `all_layers`, every block's (an unrolled stack without remat keeps the
    forward's gathered copies for the backward).
    """
    extra = gathered = 0
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0],
        _shardings(param_shardings),
        strict=True,
    ):
        fsdp = _axis_size_in_spec(s, sharding.FSDP)
        if fsdp == 1:
            continue
        local = math.prod(s.shard_shape(x.shape))
        share = 1
        if getattr(path[0], "key", None) == "layers" and not all_layers:
            share = config.n_layers
        extra += (local * fsdp - local) // share
        gathered += local * fsdp * np.dtype(x.dtype).itemsize // share
    return extra, gathered


def _axis_size_in_spec(s: NamedSharding, axis: str) -> int:
    """The size of mesh `axis` if `s`'s spec splits some dim over it, else 1."""
    for entry in s.spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        if axis in names:
            return s.mesh.shape[axis]
    return 1


def local_size(size: int, logical: str, mesh: AbstractMesh) -> int:
    """`size` on one device when the rules split the logical axis (where it divides)."""
    spec = sharding.logical_to_spec((logical,), mesh, shape=(size,))
    names = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
    return size // math.prod(mesh.shape[a] for a in names)


def weight_copies(config: ModelConfig, abstract, param_sh, gathered_extra: int, s: int,
                  skip=()) -> int:  # fmt: skip
    """P_seen · s when the matmuls see the weights in another dtype than they are stored in
    (bf16 compute over f32 master weights; on XLA:CPU also bf16 weights computed in f32): the
    local shards (less `skip`, parameters no matmul sees whole) plus the gathered block."""
    if config.dtype == config.param_dtype and s == np.dtype(config.weight_dtype).itemsize:
        return 0
    seen = {k: v for k, v in abstract.items() if k not in skip}
    return (shard_elements(seen, {k: param_sh[k] for k in seen}) + gathered_extra) * s


# ---------------------------------------------------------------------------------------------
# Activations of the train step


def activation_itemsize(config: ModelConfig, platform: str) -> int:
    """Bytes XLA keeps per activation element of the compute dtype: XLA:CPU computes 16-bit
    floats in float32 and holds the float32 values (its buffer assignment of a bfloat16 step
    shows float32 copies of every saved activation), so 4 there; the dtype's size elsewhere."""
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform {platform!r}; use one of {PLATFORMS}")
    if platform == "cpu":
        return 4
    return np.dtype(config.compute_dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LocalShape:
    """One device's share of a train step: T tokens of sequences of S slots; D width (whole:
    the residual stream splits its batch, not its width), H, K, F, V the heads, kv heads, MLP
    width and vocabulary left on the device by the tensor axis, E head_dim, s the bytes of a
    stored compute-dtype activation (`activation_itemsize`)."""

    T: int
    S: int
    D: int
    H: int
    K: int
    E: int
    F: int
    V: int
    s: int


def local_shape(config: ModelConfig, mesh: AbstractMesh, tokens: int, seq_len: int,
                platform: str) -> LocalShape:  # fmt: skip
    return LocalShape(
        T=tokens, S=seq_len, D=config.d_model, E=config.head_dim,
        H=local_size(config.n_heads, "heads", mesh),
        K=local_size(config.n_kv_heads, "kv_heads", mesh),
        F=local_size(config.mlp_dim, "mlp", mesh),
        V=local_size(config.vocab_size, "vocab", mesh),
        s=activation_itemsize(config, platform),
    )  # fmt: skip


def saved_per_token(x: LocalShape, remat: str) -> int:
    """Bytes per token and layer that one block keeps for its backward (the scan stacks them
    over layers), by remat policy. What `jax.vjp` of a block saves:

      none  float32: softmax output H·S, the two RMSNorms' float32 inputs 2·D; compute dtype:
            probabilities H·S, the MLP's 6·F (gate, up, their activations and product), 4·D
            (block input, normed inputs, mid-block residual), q and attention output 2·H·E,
            k and v 2·K·E
      full  the block input, D
      dots  the projections' outputs: q, k, v (H + 2K)·E, gate and up 2·F, and 2·D (the block
            input, the attention projection's output)
      attn  the block input and attention's output, D + H·E
    """
    H, K, E, F, D, S, s = x.H, x.K, x.E, x.F, x.D, x.S, x.s
    if remat == "none":
        return 4 * (H * S + 2 * D) + s * (H * S + 6 * F + 4 * D + 2 * H * E + 2 * K * E)
    if remat == "full":
        return s * D
    if remat == "dots":
        return s * ((H + 2 * K) * E + 2 * F + 2 * D)
    if remat == "attn":
        return s * (D + H * E)
    raise UserError(f"unknown remat policy {remat!r}")


def forward_per_token(x: LocalShape) -> int:
    """Bytes per token of one block's forward when nothing is kept for a backward (a frozen
    teacher or reference): the larger of the MLP's three F-wide intermediates and attention's
    float32 scores with their probabilities, plus two float32 D-wide rows (the residual and
    its norm)."""
    return max(3 * x.F * x.s, x.H * x.S * (4 + x.s)) + 2 * x.D * 4


def block_backward_per_token(x: LocalShape) -> int:
    """Bytes per token of the block being differentiated, beyond the saved stack: one block's
    activations, a(none) (without remat the scan's backward step copies its slice out of the
    stack; with remat it recomputes them), plus the float32 cotangent of the scores, H·S·4."""
    return saved_per_token(x, "none") + 4 * x.H * x.S
