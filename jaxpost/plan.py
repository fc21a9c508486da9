"""Memory planner: will a run fit, per device, and which knob helps when it does not.

    python -m jaxpost.plan --model=qwen2.5-7b --mesh=1,8,1 --batch=64 --seq_len=2048 \\
        --teacher=qwen2.5-7b --device_memory_gb=80 --platform=gpu

prints a table of per-device bytes and one JSON line, and exits with status 1 and a message
naming the biggest term and the knob that shrinks it when the plan does not fit. Experiments
call `check_fits(plan(...))` before they compile anything.

What it models: the jitted SFT train step, `train.make_step(train.sft_objective(config),
optimizer)` under `train.jit_step` (state donated), traced under `jax.set_mesh(mesh)` (so the
model batch-splits its activations under FSDP), plus the sampler's KV cache and a distillation
teacher when asked. Nothing is allocated or compiled: parameter and optimizer-state sizes come
from `jax.eval_shape` and the sharding rules over an `AbstractMesh` (a 256-chip pod is planned on
a laptop), the activations from the formulas in `jaxpost.plan_terms`, read off the model's code
(what `jax.vjp` of one block saves under each remat policy) and off XLA's buffer assignment of the
compiled step (which buffers are live at its peak).

How it is checked: `Plan.temp_bytes` (the step's temporaries: every train-step term but the
parameters, optimizer state and batch, which are its arguments) against XLA's
`compiled.memory_analysis().temp_size_in_bytes` of that step: in tests/test_plan.py on the tiny
model on 1, (2,2,2) and (1,8,1) meshes for every remat policy, and in scripts/bench_memory.py at
Qwen2.5-0.5B's shape (vocabulary 32,768, 8 x 1024 tokens, one device; benchmarks/memory.md):
within 20% everywhere, on XLA:CPU. GPU and TPU plans use the same formulas with their dtype
sizes (`platform`); they are not measured here.

Notation, per device: T = (B / dp) · L tokens (dp = data x fsdp, B divided by `grad_accum`),
S = L, D the width, E head_dim, n the layers; H, K, F and V the heads, kv heads, MLP width and
vocabulary left on a device by the tensor axis (where the rules split them); s the bytes of a
stored compute-dtype activation (4 on XLA:CPU, which computes bfloat16 in float32; the dtype's
size on GPU/TPU); P the parameters a device holds.

Terms (bytes per device):
  params        Σ over parameters of their shard's bytes (storage dtype, `param_dtype`).
  optimizer     Σ over optax state leaves (`jax.eval_shape(optimizer.init, params)`) of their
                shard's bytes; AdamW keeps two moments in the parameters' dtype, sharded like them.
  batch         the step's integer inputs, 3 · T · 4.
  gradients     = params: one gradient per parameter, sharded like it. The optimizer's update
                is written in place into the donated state, so it needs no copy.
  gathered_weights  FSDP only: weights split over fsdp are all-gathered (still split over
                tensor) before their matmuls: the non-block weights plus one block's (the scan
                gathers a layer's weights in its step, forward and backward again), or every
                block's for an unrolled stack without remat.
  weight_copies P_seen · s when the matmuls see weights in another dtype than they are stored
                in (bfloat16 compute over float32 master weights; on XLA:CPU also bfloat16
                weights, computed in float32). P_seen counts local shards plus the gathered
                block.
  activations   n · T · a(remat): what the scanned blocks keep for the backward, per token and
                layer (`plan_terms.saved_per_token`):
                  none  4·(H·S + 2·D) + s·(H·S + 6·F + 4·D + 2·H·E + 2·K·E)
                  full  s·D                         (the block input)
                  dots  s·((H + 2K)·E + 2·F + 2·D)  (the projections' outputs)
                  attn  s·(D + H·E)                 (the block input, attention's output)
  backward_peak the largest transient of the backward, the larger of two phases:
                  loss   4 · T·V·4 + 2 · V·D_local·4: the materialized loss holds four float32
                         [T, V] buffers at once (logits, log-softmax, cotangent, its transpose
                         for the head gradient) and float32 gradients of the embedding/head;
                  block  T · (a(none) + 4·H·S): the block being differentiated holds one
                         block's activations (without remat the scan's backward step copies its
                         slice of the stack; with remat it recomputes them) and the float32
                         cotangent of its scores.
  teacher       the teacher's parameters, sharded by the same rules (an input, never trained).
  distill_logits  student and teacher logits over the N = B/dp completions of M tokens
                (M = max_new_tokens, else L). Naive: 6 · N·M·V·4 (both logits, both
                log-softmaxes, the mixture and the student logits' gradient). Fused kernel
                (`kernels.fused_linear_jsd`): the logits only ever exist in blocks,
                N·M·(2·D·b + 16) for the two models' hidden states and per-row statistics plus
                6 · ROWS_BLOCK · min(V, VOCAB_BLOCK) · 4. Not measured against compilation.
  kv_cache      the sampler's cache, n · 2 · B_s · K · S · E · b with B_s over dp and K over
                tensor (where they divide); S = L slots. Counted when `sample_batch` is given.
  decode_weights  on CPU, the sampler's per-layer copy of the stacked blocks' weights (sliced
                once before its decode loop: slices inside it are copied every step there).

The sampler and the train step do not run at once: the total is the persistent terms (params,
optimizer, teacher) plus the larger of the two phases (sampling: KV cache and decode weights;
training: everything else). An unrolled stack (`scan_layers=False`) is planned as remat="none": XLA may undo the
rematerialization of an unrolled loop (it does on CPU), so only the scan's is counted on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import jax
import numpy as np
import optax

from jaxpost import models, sharding, train
from jaxpost.errors import UserError
from jaxpost.models import ModelConfig
from jaxpost.models.configs import REMAT
from jaxpost.plan_terms import (  # noqa: F401  (Plan, check_fits, GiB: this module's API)
    ARGUMENTS,
    LOSS_IMPLS,
    OBJECTIVES,
    PERSISTENT,
    PLATFORMS,
    ROWS_BLOCK,
    SAMPLING,
    VOCAB_BLOCK,
    GiB,
    Plan,
    abstract_mesh,
    block_backward_per_token,
    check_fits,
    fsdp_gathered,
    head_bytes,
    local_shape,
    local_size,
    saved_per_token,
    shard_elements,
    tree_bytes,
)


def make_named_optimizer(optimizer) -> optax.GradientTransformation:
    """ "adamw" (the trainer's AdamW with clipping), "sgd", or an optax transformation as is."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if optimizer == "adamw":
        return train.make_optimizer(train.OptimConfig())
    if optimizer == "sgd":
        return optax.sgd(1e-3)
    raise UserError(f"unknown optimizer {optimizer!r}; use 'adamw', 'sgd' or an optax transform")


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
    objective: str = "sft",
    loss_impl: str = "materialized",
    platform: str | None = None,
) -> Plan:
    """Estimate per-device bytes of a training run on a (data, fsdp, tensor) mesh.

    Args:
      config: the student. Its `remat`, `scan_layers`, `dtype` and `param_dtype` are honoured.
      mesh_shape: as for `sharding.make_mesh` ("1,8,1", "fsdp=8", (1, 8, 1), dict).
      batch: global batch (sequences per step); must divide by data x fsdp.
      seq_len: tokens per sequence, L.
      optimizer: "adamw", "sgd" or an optax transformation (its state is `eval_shape`d).
      remat: override `config.remat` ("none", "full", "dots", "attn").
      teacher_config: a distillation teacher (its params, and the distillation logits).
      fused_kernel: distillation logits through the fused blockwise kernel.
      sample_batch: sequences the sampler decodes at once (adds its KV cache); None: no sampling.
      max_new_tokens: completion length M of the distillation logits (default L).
      device_memory_bytes: per-device capacity; None: `fits` is always True.
      devices: device count the mesh must multiply to (default: the product of its sizes).
      grad_accum: micro-batches per step; activations are those of one micro-batch.
      objective, loss_impl: the train step's loss and how its logits are computed; the terms
        model "sft" with "materialized" [T, V] logits.
      platform: "cpu", "gpu" or "tpu" (default: this process's backend): how XLA stores
        16-bit activations (`plan_terms.activation_itemsize`).

    Raises `UserError` (a ValueError), before anything is compiled, for a mesh that does not
    multiply to the device count, an unknown axis name, a batch not divisible by the
    data-parallel size, or an objective the planner does not model.
    """
    remat = config.remat if remat is None else remat
    if remat not in REMAT:
        raise UserError(f"unknown remat policy {remat!r}; use one of {REMAT}")
    if objective not in OBJECTIVES or loss_impl not in LOSS_IMPLS:
        raise UserError(f"the planner models objective in {OBJECTIVES} with loss_impl in "
                        f"{LOSS_IMPLS}; got {objective!r}, {loss_impl!r}")  # fmt: skip
    platform = jax.default_backend() if platform is None else platform
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform {platform!r}; use one of {PLATFORMS}")
    if batch < 1 or seq_len < 1 or grad_accum < 1:
        raise UserError("batch, seq_len and grad_accum must be >= 1")
    mesh = abstract_mesh(mesh_shape, devices)
    dp = sharding.data_parallel_size(mesh)
    if batch % (dp * grad_accum):
        raise UserError(
            f"batch {batch} is not divisible by the data-parallel size {dp} (data "
            f"{mesh.shape['data']} x fsdp {mesh.shape['fsdp']}) times grad_accum {grad_accum}"
        )
    if seq_len > config.max_seq_len:
        raise UserError(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    notes = []
    if not config.scan_layers and remat != "none":
        notes.append(f'unrolled layers: remat="{remat}" planned as "none" (XLA may undo it)')
        remat = "none"
    config = config.replace(remat=remat)
    tx = make_named_optimizer(optimizer)

    abstract = models.abstract_params(config)
    param_sh = sharding.param_shardings(config, mesh)
    params = tree_bytes(abstract, param_sh)
    opt_shapes = jax.eval_shape(tx.init, abstract)
    opt = tree_bytes(opt_shapes, sharding.opt_state_shardings(tx, opt_shapes, param_sh))
    all_layers = not config.scan_layers and remat == "none"
    gathered_extra, gathered_bytes = fsdp_gathered(abstract, param_sh, config, all_layers)

    rows = batch // dp // grad_accum  # sequences per device per micro-batch
    x = local_shape(config, mesh, rows * seq_len, seq_len, platform)
    b = np.dtype(config.compute_dtype).itemsize
    # The matmuls see the weights in another dtype than they are stored in: bf16 compute over
    # f32 master weights, or (XLA:CPU) bf16 weights computed in f32.
    copies = config.dtype != config.param_dtype or x.s != np.dtype(config.weight_dtype).itemsize
    embed_shard = math.prod(param_sh["embed"].shard_shape(abstract["embed"].shape))
    terms = {
        "params": params,
        "optimizer": opt,
        "batch": 3 * x.T * 4,
        "gradients": params,
        "gathered_weights": gathered_bytes,
        "weight_copies": (shard_elements(abstract, param_sh) + gathered_extra) * x.s
        if copies
        else 0,
        "activations": config.n_layers * x.T * saved_per_token(x, remat),
        "backward_peak": max(head_bytes(x, embed_shard), x.T * block_backward_per_token(x)),
    }
    if teacher_config is not None:
        if teacher_config.vocab_size != config.vocab_size:
            raise UserError(
                f"teacher and student vocabularies differ ({teacher_config.vocab_size} vs "
                f"{config.vocab_size})"
            )
        terms["teacher"] = tree_bytes(
            models.abstract_params(teacher_config), sharding.param_shardings(teacher_config, mesh)
        )
        M = seq_len if max_new_tokens is None else max_new_tokens
        V = local_size(config.vocab_size, "vocab", mesh)
        if fused_kernel:
            width = config.d_model + teacher_config.d_model
            terms["distill_logits"] = (
                rows * M * (width * b + 16) + 6 * ROWS_BLOCK * min(V, VOCAB_BLOCK) * 4
            )
        else:
            terms["distill_logits"] = 6 * rows * M * V * 4
    if sample_batch is not None:
        if sample_batch < 1:
            raise UserError(f"sample_batch must be >= 1, got {sample_batch}")
        cache_sh = sharding.cache_shardings(config, mesh, sample_batch, capacity=seq_len)
        kv_shape = (sample_batch, config.n_kv_heads, seq_len, config.head_dim)
        kv = math.prod(cache_sh.k[0].shard_shape(kv_shape)) * b
        terms["kv_cache"] = config.n_layers * 2 * kv
        if platform == "cpu":  # the sampler's per-layer slices of the stacked weights
            layers = {"layers": abstract["layers"]}
            terms["decode_weights"] = tree_bytes(layers, {"layers": param_sh["layers"]})
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
    raise UserError(
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
    p.add_argument("--remat", default=None, choices=REMAT)
    p.add_argument("--platform", default=None, choices=PLATFORMS,
                   help="where the run will compile (default: this machine's backend)")  # fmt: skip
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
            platform=args.platform,
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
