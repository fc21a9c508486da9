"""Memory planner: will a run fit, per device, and which knob helps when it does not.

    python -m jaxpost.plan --model=qwen2.5-7b --mesh=1,8,1 --batch=64 --seq_len=2048 \\
        --teacher=qwen2.5-7b --device_memory_gb=80

prints a table of per-device bytes and one JSON line, and exits with status 1 and a message
naming the biggest term and the knob that shrinks it when the plan does not fit. Experiments
call `check_fits(plan(...))` before they compile anything.

Nothing is allocated or compiled: parameter and optimizer-state sizes come from `jax.eval_shape`
and the sharding rules of `jaxpost.sharding` over an `AbstractMesh` (so a 256-chip pod is planned
on a laptop), the rest from the analytical model below. Notation: per device, T = (B / dp) · L
tokens (dp = data x fsdp, B divided by `grad_accum`), b the compute dtype's bytes, H, K, F and V
the heads, kv heads, MLP width and vocabulary *local to a device* (divided by the tensor axis when
the rules split them, i.e. when divisible), D the width, E head_dim, n the layers.

Terms (bytes per device):
  params        Σ over parameters of their shard's bytes (storage dtype, `param_dtype`).
  optimizer     Σ over optax state leaves (`jax.eval_shape(optimizer.init, params)`) of their
                shard's bytes; AdamW keeps two moments in the parameters' dtype, sharded like them.
  gradients     = params: one gradient per parameter, sharded like it.
  update        = params: the optimizer's update tree, live next to the old state (the step keeps
                the old state until it knows the update is finite).
  gathered_weights  FSDP only: every weight split over fsdp is all-gathered (still split over
                tensor) before its matmul, and the backward needs it again for the input's
                gradient, so the forward's gathered copy stays live until then: Σ over fsdp-split
                parameters of (their shard's bytes · fsdp). With remat the gather is recomputed
                too, so only one block's weights (the largest) plus the non-block ones count.
  weight_copies P_seen · b when compute and parameter dtypes differ (bf16 compute, f32 master
                weights): the cast weights are kept for the backward pass. P_seen counts the
                weights as the matmuls see them: local shards, fsdp-split ones gathered (the cast
                follows the gather; XLA keeps both copies).
  activations   what the backward pass needs, per layer and token (remat="none"):
                  a = b·(5D + (2H + 3K)·E + H·E + 4F) + 8·H·L (+ b·H·L if b < 4)
                i.e. residual stream, norms, q/k/v before and after rope, attention output,
                gate/up/silu/product, and two f32 score-sized buffers (masked scores and
                probabilities, H·L per query token). With remat="dots" only matmul outputs and the
                block input are kept, b·((H + 2K)·E + 3D + 2F); with remat="full" only the block
                input, b·D; both also recompute one block at a time (+ a·T). The LM head and loss
                add T·(5·V·4 + 4·D·b): float32 logits, log-softmax, its gradient and the
                embedding output. Total: n·T·a(remat) [+ T·a] + T·(5·V·4 + 4·D·b).
                The constants (two score buffers, five logits copies) are what XLA's buffer
                assignment of `train.make_step(train.sft_objective(...))` shows;
                tests/test_plan.py checks the sum against `compiled.memory_analysis()`.
  batch         the step's integer inputs, 3 · T · 4.
  teacher       the teacher's parameters, sharded by the same rules (an input, never trained).
  distill_logits  student and teacher logits over the N = B/dp completions of M tokens
                (M = max_new_tokens, else L). Naive: 6 · N·M·V·4 (both logits, both
                log-softmaxes, the mixture and the student logits' gradient). Fused kernel
                (`kernels.fused_linear_jsd`): the logits only ever exist in blocks,
                N·M·(2·D·b + 16) for the two models' hidden states and per-row statistics plus
                6 · ROWS_BLOCK · min(V, VOCAB_BLOCK) · 4.
  kv_cache      the sampler's cache, n · 2 · B_s · K · S · E · b with B_s over dp and K over
                tensor (where they divide); S = L slots. Counted when `sample_batch` is given.

The sampler and the train step do not run at once: the total is the persistent terms (params,
optimizer, teacher) plus the larger of the two phases (sampling: KV cache; training: everything
else). On XLA:CPU remat saves little (its scheduler hoists the recomputation), so the remat
estimates describe GPU/TPU compilers; the measured agreement is for remat="none". It also assumes
the step is traced under `jax.set_mesh(mesh)`, which is what lets the model batch-split its
activations under FSDP (`jaxpost.sharding`); traced without it, an FSDP step needs about twice
the plan.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, NamedSharding

from jaxpost import models, sharding, train
from jaxpost.models import ModelConfig

GiB = 1024**3
ROWS_BLOCK = 256  # rows of the fused distillation kernel's block
VOCAB_BLOCK = 2048  # vocabulary columns of the fused distillation kernel's block
PERSISTENT = ("params", "optimizer", "teacher")
SAMPLING = ("kv_cache",)

# The knob that shrinks each term, for the "does not fit" message.
_KNOBS = {
    "params": "shard the weights over more devices (a larger fsdp axis), or bfloat16 params",
    "optimizer": "shard the optimizer state over more devices (a larger fsdp axis)",
    "gradients": "shard over more devices (a larger fsdp axis), or bfloat16 params",
    "update": "shard over more devices (a larger fsdp axis), or bfloat16 params",
    "gathered_weights": 'remat="full" (one block gathered at a time), or more tensor parallelism',
    "weight_copies": "a larger fsdp axis, or the same compute and param dtype",
    "activations": 'remat="full", a smaller per-device batch (or grad_accum), or a shorter seq_len',
    "batch": "a smaller per-device batch",
    "teacher": "shard the teacher over more devices (fsdp/tensor), or a bfloat16 teacher",
    "distill_logits": "the fused distillation kernel (fused_kernel=True), or a smaller batch",
    "kv_cache": "a smaller sample_batch, or more data/tensor parallelism for sampling",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory estimate. `terms` maps each term to bytes; see the module docstring."""

    terms: dict[str, int]
    total: int
    device_memory_bytes: int | None
    mesh: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def train_step_bytes(self) -> int:
        """The train step alone: everything but the sampler's cache and the teacher."""
        return sum(v for k, v in self.terms.items() if k not in SAMPLING + ("teacher",))

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
            f"what helps: {_KNOBS[big]}"
        )

    def table(self) -> str:
        """A fixed-width table of the terms, largest first, then the total."""
        rows = sorted(self.terms.items(), key=lambda kv: -kv[1])
        lines = [f"{'term':<16}{'bytes/device':>16}{'GiB':>10}  phase"]
        for name, value in rows:
            phase = (
                "persistent"
                if name in PERSISTENT
                else "sampling"
                if name in SAMPLING
                else "train step"
            )
            lines.append(f"{name:<16}{value:>16,d}{value / GiB:>10.3f}  {phase}")
        lines.append(f"{'total':<16}{self.total:>16,d}{self.total / GiB:>10.3f}")
        if self.device_memory_bytes is not None:
            lines.append(f"{'device memory':<16}{self.device_memory_bytes:>16,d}"
                         f"{self.device_memory_bytes / GiB:>10.3f}  fits: {self.fits}")  # fmt: skip
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_json(self) -> str:
        return json.dumps({"mesh": self.mesh, "terms": self.terms, "total": self.total,
                           "device_memory_bytes": self.device_memory_bytes, "fits": self.fits,
                           "biggest": self.biggest})  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def check_fits(p: Plan) -> Plan:
    """Raise `MemoryError` with `p.message` when the plan does not fit; return it otherwise."""
    if not p.fits:
        raise MemoryError(p.message)
    return p


# ---------------------------------------------------------------------------------------------
# Shard sizes from shapes and rules


def abstract_mesh(mesh_shape, devices: int | None = None) -> AbstractMesh:
    """A (data, fsdp, tensor) `AbstractMesh`: sizes without devices, so any pod can be planned.

    `mesh_shape` is anything `sharding.make_mesh` takes. `devices` defaults to the product of
    the sizes (then no size may be -1); when given, the sizes must multiply to it.
    """
    if devices is None:
        sizes = _raw_sizes(mesh_shape)
        if -1 in sizes:
            raise ValueError(f"mesh shape {mesh_shape!r} has a -1: pass the device count")
        devices = math.prod(sizes)
    if devices < 1:
        raise ValueError(f"device count must be >= 1, got {devices}")
    sizes = sharding._mesh_sizes(mesh_shape, devices)
    return AbstractMesh(sizes, sharding.MESH_AXES)


def _raw_sizes(mesh_shape) -> list[int]:
    if isinstance(mesh_shape, str):
        mesh_shape = sharding.parse_mesh_shape(mesh_shape)
    if isinstance(mesh_shape, Mapping):
        sharding._check_axis_names(mesh_shape)
        return [int(mesh_shape.get(a, 1)) for a in sharding.MESH_AXES]
    return [int(s) for s in mesh_shape]


def _tree_bytes(abstract_tree, shardings_tree) -> int:
    """Σ of shard bytes: prod(shard shape) · itemsize for each leaf."""
    leaves = jax.tree.leaves(abstract_tree)
    shards = jax.tree.leaves(shardings_tree, is_leaf=lambda x: isinstance(x, NamedSharding))
    return sum(
        math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x, s in zip(leaves, shards, strict=True)
    )


def _fsdp_gathered(abstract_tree, shardings_tree, remat: str) -> tuple[int, int]:
    """(elements, bytes) per device of the fsdp-split weights once all-gathered over fsdp,
    minus the elements of their own shards (so `P_local + elements` is what matmuls see).

    remat="none": every such weight (the forward's gathered copies live until the backward);
    otherwise the non-block weights plus the largest block's, gathered one block at a time.
    """
    per_block: dict[object, list[int]] = {}
    for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_tree)[0],
        jax.tree.leaves(shardings_tree, is_leaf=lambda v: isinstance(v, NamedSharding)),
        strict=True,
    ):
        fsdp = _axis_size_in_spec(s, sharding.FSDP)
        if fsdp == 1:
            continue
        local = math.prod(s.shard_shape(x.shape))
        gathered = local * fsdp
        keys = [getattr(k, "key", None) for k in path]
        block = keys[1] if remat != "none" and keys[0] == "layers" else None
        counts = per_block.setdefault(block, [0, 0])
        counts[0] += gathered - local
        counts[1] += gathered * np.dtype(x.dtype).itemsize
    outside = per_block.pop(None, [0, 0])
    largest = max(per_block.values(), key=lambda c: c[1], default=[0, 0])
    return outside[0] + largest[0], outside[1] + largest[1]


def _axis_size_in_spec(s: NamedSharding, axis: str) -> int:
    """The size of mesh `axis` if `s`'s spec splits some dim over it, else 1."""
    for entry in s.spec:
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        if axis in names:
            return s.mesh.shape[axis]
    return 1


def _local(size: int, axes: str, mesh: AbstractMesh) -> int:
    """`size` on one device when the logical axis `axes` is split by the rules (if it divides)."""
    spec = sharding.logical_to_spec((axes,), mesh, shape=(size,))
    names = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
    return size // math.prod(mesh.shape[a] for a in names)


def make_named_optimizer(optimizer) -> optax.GradientTransformation:
    """ "adamw" (the trainer's AdamW with clipping), "sgd", or an optax transformation as is."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "adamw":
        return train.make_optimizer(train.OptimConfig())
    if optimizer == "sgd":
        return optax.sgd(1e-3)
    raise ValueError(f"unknown optimizer {optimizer!r}; use 'adamw', 'sgd' or an optax transform")


# ---------------------------------------------------------------------------------------------
# The analytical activation model


def activation_bytes_per_token(config: ModelConfig, mesh: AbstractMesh, seq_len: int) -> dict:
    """Bytes per token and layer kept for the backward pass under each remat policy, plus the
    LM head's per-token bytes (see the module docstring for the formulas)."""
    b = np.dtype(config.compute_dtype).itemsize
    D, E, L = config.d_model, config.head_dim, seq_len
    H = _local(config.n_heads, "heads", mesh)
    K = _local(config.n_kv_heads, "kv_heads", mesh)
    F = _local(config.mlp_dim, "mlp", mesh)
    V = _local(config.vocab_size, "vocab", mesh)
    scores = 8 * H * L + (b * H * L if b < 4 else 0)
    none = b * (5 * D + (2 * H + 3 * K) * E + H * E + 4 * F) + scores
    return {
        "none": none,
        "dots": b * ((H + 2 * K) * E + 3 * D + 2 * F),
        "full": b * D,
        "head": 5 * V * 4 + 4 * D * b,
    }


def activations(config: ModelConfig, mesh: AbstractMesh, tokens: int, seq_len: int,
                remat: str) -> int:  # fmt: skip
    """n·T·a(remat) [+ T·a(none) for the one block recomputed at a time] + T·head."""
    per = activation_bytes_per_token(config, mesh, seq_len)
    total = config.n_layers * tokens * per[remat] + tokens * per["head"]
    if remat != "none":
        total += tokens * per["none"]
    return total


# ---------------------------------------------------------------------------------------------
# The plan


def plan(
    config: ModelConfig,
    mesh_shape,
    *,
    batch: int,
    seq_len: int,
    optimizer="adamw",
    remat: str | None = None,
    teacher_config: ModelConfig | None = None,
    fused_kernel: bool = True,
    sample_batch: int | None = None,
    max_new_tokens: int | None = None,
    device_memory_bytes: int | None = None,
    devices: int | None = None,
    grad_accum: int = 1,
) -> Plan:
    """Estimate per-device bytes of a training run on a (data, fsdp, tensor) mesh.

    Args:
      config: the student. Its `remat`, `dtype` and `param_dtype` are honoured.
      mesh_shape: as for `sharding.make_mesh` ("1,8,1", "fsdp=8", (1, 8, 1), dict).
      batch: global batch (sequences per step); must divide by data x fsdp.
      seq_len: tokens per sequence, L.
      optimizer: "adamw", "sgd" or an optax transformation (its state is `eval_shape`d).
      remat: override `config.remat` ("none", "full", "dots").
      teacher_config: a distillation teacher (its params, and the distillation logits).
      fused_kernel: distillation logits through the fused blockwise kernel.
      sample_batch: sequences the sampler decodes at once (adds its KV cache); None: no sampling.
      max_new_tokens: completion length M of the distillation logits (default L).
      device_memory_bytes: per-device capacity; None: `fits` is always True.
      devices: device count the mesh must multiply to (default: the product of its sizes).
      grad_accum: micro-batches per step; activations are those of one micro-batch.

    Raises ValueError, before anything is compiled, for a mesh that does not multiply to the
    device count, an unknown axis name, or a batch not divisible by the data-parallel size.
    """
    remat = config.remat if remat is None else remat
    if remat not in ("none", "full", "dots"):
        raise ValueError(f"unknown remat policy {remat!r}; use 'none', 'full' or 'dots'")
    if batch < 1 or seq_len < 1 or grad_accum < 1:
        raise ValueError("batch, seq_len and grad_accum must be >= 1")
    mesh = abstract_mesh(mesh_shape, devices)
    dp = sharding.data_parallel_size(mesh)
    if batch % (dp * grad_accum):
        raise ValueError(
            f"batch {batch} is not divisible by the data-parallel size {dp} (data "
            f"{mesh.shape['data']} x fsdp {mesh.shape['fsdp']}) times grad_accum {grad_accum}"
        )
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    config = config.replace(remat=remat)
    tx = make_named_optimizer(optimizer)

    abstract = models.abstract_params(config)
    param_sh = sharding.param_shardings(config, mesh)
    params = _tree_bytes(abstract, param_sh)
    opt_shapes = jax.eval_shape(tx.init, abstract)
    opt = _tree_bytes(opt_shapes, sharding.opt_state_shardings(tx, opt_shapes, param_sh))
    param_count = sum(
        math.prod(s.shard_shape(x.shape))
        for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(param_sh))
    )
    gathered_extra, gathered_bytes = _fsdp_gathered(abstract, param_sh, remat)

    rows = batch // dp // grad_accum  # sequences per device per micro-batch
    tokens = rows * seq_len
    b = np.dtype(config.compute_dtype).itemsize
    terms = {
        "params": params,
        "optimizer": opt,
        "gradients": params,
        "update": params,
        "gathered_weights": gathered_bytes,
        "weight_copies": (param_count + gathered_extra) * b
        if config.dtype != config.param_dtype
        else 0,
        "activations": activations(config, mesh, tokens, seq_len, remat),
        "batch": 3 * tokens * 4,
    }
    notes = []
    if teacher_config is not None:
        if teacher_config.vocab_size != config.vocab_size:
            raise ValueError(
                f"teacher and student vocabularies differ ({teacher_config.vocab_size} vs "
                f"{config.vocab_size})"
            )
        terms["teacher"] = _tree_bytes(
            models.abstract_params(teacher_config), sharding.param_shardings(teacher_config, mesh)
        )
        M = seq_len if max_new_tokens is None else max_new_tokens
        V = _local(config.vocab_size, "vocab", mesh)
        if fused_kernel:
            width = config.d_model + teacher_config.d_model
            terms["distill_logits"] = (
                rows * M * (width * b + 16) + 6 * ROWS_BLOCK * min(V, VOCAB_BLOCK) * 4
            )
        else:
            terms["distill_logits"] = 6 * rows * M * V * 4
    if sample_batch is not None:
        if sample_batch < 1:
            raise ValueError(f"sample_batch must be >= 1, got {sample_batch}")
        cache_sh = sharding.cache_shardings(config, mesh, sample_batch, capacity=seq_len)
        kv_shape = (sample_batch, config.n_kv_heads, seq_len, config.head_dim)
        kv = math.prod(cache_sh.k[0].shard_shape(kv_shape)) * b
        terms["kv_cache"] = config.n_layers * 2 * kv
    persistent = sum(terms.get(k, 0) for k in PERSISTENT)
    train_phase = sum(v for k, v in terms.items() if k not in PERSISTENT + SAMPLING)
    sample_phase = sum(terms.get(k, 0) for k in SAMPLING)
    if sample_phase > train_phase:
        notes.append("the sampling phase (KV cache) is the peak, not the train step")
    return Plan(
        terms=terms,
        total=persistent + max(train_phase, sample_phase),
        device_memory_bytes=device_memory_bytes,
        mesh=dict(mesh.shape),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# Command line


def _load_config(name: str, dtype: str | None = None) -> ModelConfig:
    """A preset name or a local Hugging Face directory (only its config.json is read)."""
    if name in models.PRESETS:
        config = models.get_config(name)
        return config if dtype is None else config.replace(dtype=dtype, param_dtype=dtype)
    import os

    if os.path.isdir(name):
        from jaxpost.models import hf

        return hf.read_config(name, dtype)
    raise ValueError(
        f"--model {name!r} is neither a preset ({sorted(models.PRESETS)}) nor a local directory"
    )


def _parse_args(argv: Sequence[str]):
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m jaxpost.plan",
        description="Per-device memory plan of a jaxpost training run (nothing is compiled).",
    )
    p.add_argument("--model", required=True, help="preset name or local HF checkpoint dir")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor or e.g. fsdp=8,tensor=2")
    p.add_argument("--devices", type=int, default=None,
                   help="device count the mesh must multiply to (default: the mesh's product; "
                   "needed to fill a -1)")  # fmt: skip
    p.add_argument("--batch", type=int, required=True, help="global batch (sequences)")
    p.add_argument("--seq_len", type=int, required=True)
    p.add_argument("--teacher", default=None, help="preset or HF dir of a distillation teacher")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--remat", default=None, choices=("none", "full", "dots"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default: the model's)")  # fmt: skip
    p.add_argument("--param_dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--naive_logits", action="store_true", help="no fused distillation kernel")
    p.add_argument("--sample_batch", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--device_memory_gb", type=float, default=None, help="GiB per device")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = _load_config(args.model)
        changes = {k: getattr(args, k) for k in ("dtype", "param_dtype") if getattr(args, k)}
        config = config.replace(**changes)
        teacher = None if args.teacher is None else _load_config(args.teacher)
        memory = None if args.device_memory_gb is None else int(args.device_memory_gb * GiB)
        p = plan(
            config, args.mesh, batch=args.batch, seq_len=args.seq_len, optimizer=args.optimizer,
            remat=args.remat, teacher_config=teacher, fused_kernel=not args.naive_logits,
            sample_batch=args.sample_batch, max_new_tokens=args.max_new_tokens,
            device_memory_bytes=memory, devices=args.devices, grad_accum=args.grad_accum,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(p.table())
    print(p.to_json())
    if not p.fits:
        print(f"error: {p.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
