"""Memory planner: will a run fit, per device, and which knob helps when it does not.

    python -m jaxpost.plan --model=qwen2.5-7b --mesh=1,8,1 --objective=opd \\
        --teacher=qwen2.5-7b --loss_impl=auto --batch=64 --prompt_len=256 \\
        --completion_len=1024 --device_memory_gb=80 --platform=gpu

prints a table of per-device bytes and one JSON line, and exits with status 1 and a message
naming the biggest term and the knob that shrinks it when the plan does not fit
(`jaxpost.plan_cli`). Every program plans each step through `inputs.check_memory` before it
compiles anything.

What it models: the train step that runs, `train.make_step(objective, optimizer)` under
`train.jit_step` (state donated; teacher or reference parameters frozen inputs), traced under
`jax.set_mesh(mesh)`, for objective = sft (`train.sft_objective`, a `data.SequenceBatch`
[B, L]), grpo (`grpo_objective`, a `data.CompletionBatch` of B completions: prompts [B, P],
completions [B, M], with or without a reference policy) and opd (`opd_objective`: the same
batch, a teacher forward over its own prompt width Pt and the completion, and the divergence),
each on the loss path `loss_impl` names as the objective resolves it (`plan_step.resolve_impl`):
"materialized" [R, V] logits, "fused_linear" (hidden states and the head in vocabulary blocks,
never [R, V]), OPD's kernel D_α over materialized logits ("xla", "pallas_*"); plus the
sampler's KV cache when asked. Nothing is allocated or compiled: parameter and optimizer sizes
come from `jax.eval_shape` and the sharding rules over an `AbstractMesh` (a 256-chip pod is
planned on a laptop); the rest from the formulas below (`plan_terms`, `plan_step`), read off the
code (what `jax.vjp` of one block saves per remat policy) and off XLA:CPU's buffer assignment
and live ranges of the compiled steps (which buffers are live at each phase's peak).

How it is checked: `Plan.temp_bytes` (the step's temporaries: every train-step term but its
arguments, i.e. the parameters, optimizer state, batch and frozen parameters) against XLA's
`compiled.memory_analysis().temp_size_in_bytes` of the step built as the loops build it
(`jaxpost.plan_program`): tests/test_plan.py (SFT, every remat policy, one device and the
(2,2,2) and (1,8,1) meshes) and tests/test_plan_steps.py (every objective on both paths, GRPO
with a reference, OPD with a teacher of another width and a longer prompt, on the same meshes),
within 20%; at Qwen2.5-0.5B's shape (8 x 1024 tokens, V 32,768 and 151,936, remat none and
full, one device) `scripts/bench_kernels.py --step` prints both: every step within 3.6%, every
fused step within 0.9% (2-core CPU, XLA:CPU, 2026-12-02; benchmarks/kernels.md). Known gap:
where the [R, V] logits or the fused sweep are nearly the whole step (toy shapes: the tiny
preset at V = 8192 with remat full or 64-token sequences, a 2-layer model of 0.5B's width),
XLA:CPU packs about one such array more or less than counted: plans 25% low to 22% high in a
probe of 240 compiles on the same machine and day (the tests' shapes give the layers the share
they have in a real run). GPU and TPU plans use the same formulas with their dtype sizes
(`platform`); they are not measured here.

Notation, per device, for one micro-batch of rows = B / (dp · grad_accum) sequences (dp = data
x fsdp): L the slots of a student sequence (SFT seq_len, on-policy P + M), T = rows · L tokens
through the layers, S = L; R the rows through the LM head (materialized SFT rows · L, fused SFT
rows · (L − 1), on-policy rows · M); D the width, E head_dim, n the layers; H, K, F and V the
heads, kv heads, MLP width and vocabulary left on a device by the tensor axis; w = min(V_total,
4096) the fused sweep's block; s the bytes of a stored compute-dtype activation (4 on XLA:CPU,
which computes bfloat16 in float32; the dtype's size on GPU/TPU); P the parameters a device
holds.

Terms (bytes per device):
  params        Σ over parameters of their shard's bytes (storage dtype, `param_dtype`).
  optimizer     Σ over optax state leaves (`jax.eval_shape(optimizer.init, params)`) of their
                shard's bytes; AdamW keeps two moments in the parameters' dtype, sharded like them.
  batch         the step's batch: SFT 3 · T · 4; on-policy the int32 prompt, completion and
                masks, the float32 old and sampling logprobs, GRPO's advantages, an OPSD
                teacher prompt.
  teacher, reference  the frozen model's parameters, sharded by the same rules (inputs).
  gradients     = params: one gradient per parameter, sharded like it. The new state is
                written into the donated state's buffers (see update for its temporaries).
  gathered_weights  FSDP only: weights split over fsdp are all-gathered (still split over
                tensor) before their matmuls: the non-block weights plus one block's (the scan
                gathers a layer's weights in its step, forward and backward again), or every
                block's for an unrolled stack without remat.
  weight_copies P_seen · s when the matmuls see weights in another dtype than they are stored
                in (bfloat16 compute over float32 master weights; on XLA:CPU also bfloat16
                weights, computed in float32). P_seen counts local shards plus the gathered
                block, less the embedding table where no matmul reads it whole (it is gathered
                from; its gradient is built by a gather, `models.embedding`) and, on the fused
                path, less the head (cast block by block; see backward_peak).
  activations   n · T · a(remat): what the scanned blocks keep for the backward, per token and
                layer (`plan_terms.saved_per_token`):
                  none  4·(H·S + 2·D) + s·(H·S + 6·F + 4·D + 2·H·E + 2·K·E)
                  full  s·D                         (the block input)
                  dots  s·((H + 2K)·E + 2·F + 2·D)  (the projections' outputs)
                  attn  s·(D + H·E)                 (the block input, attention's output)
  backward_peak the largest transient of the backward, the larger of two phases:
                  block  T · (a(none) + 4·H·S): the block being differentiated holds one
                         block's activations (recomputed under remat; without, the scan's
                         backward step copies its slice of the stack) and the float32
                         cotangent of its scores;
                  loss   materialized: k float32 [R, V] arrays live at once (`plan_step`):
                         SFT 4 (logits, log-softmax, its cotangent, the cotangent's transpose
                         for the head's gradient), GRPO 3 (+1 with a reference: its logits),
                         OPD 5 for reverse KL (both models' logits and log-softmaxes, the
                         cotangent; forward KL 6, entropy-aware 7, generalized JSD 8), OPD
                         through a kernel D_α 3; plus two head-sized buffers in the storage
                         dtype (the head's gradient and one more of its size);
                         fused: t float32 [R, w] tiles (SFT 2, GRPO 3 with the entropy, OPD 4
                         with the teacher's block) + R · D · 4 (the hidden states' gradient
                         accumulator) + the heads (`plan_step.fused_head_bytes`): the student
                         head's gradient carried through the sweep and its copy out of it (2 ·
                         V·D_local in the storage dtype), or with tensor parallelism the head
                         gathered over its vocabulary ([V, D/fsdp]) and its gradient as a whole
                         float32 [V, D]; the teacher's head gathered likewise; and, where the
                         matmuls see the heads in another dtype, one converted copy of each.
  frozen_forward  GRPO's reference and OPD's teacher run their forward before the backward:
                their fsdp-gathered weights and weight copies (head included), one block's
                forward at a time at their own length, T_f · (max(3·F·s, H·S·(4 + s)) + 2·D·4)
                (T_f = rows · (Pt + M) for the teacher), and the student head's converted copy
                (XLA hoists it that early). The term is what that phase exceeds gradients +
                backward_peak by (0 when it does not: it never meets the backward's buffers).
  update        the optimizer's update computes the new parameters and optimizer state beside
                the old ones (a non-finite step keeps the old: `train.make_step`), after the
                activations are freed: gradients + params + optimizer, counted by what it
                exceeds the other temporaries (a shallow model's step; 0 at the 0.5B shape).
  kv_cache      the sampler's cache, n · 2 · B_s · K · S · E · b with B_s over dp and K over
                tensor (where they divide), S = L slots (P + M on-policy). Counted when
                `sample_batch` is given.
  decode_weights  on CPU, the sampler's per-layer copy of the stacked blocks' weights (sliced
                once before its decode loop: slices inside it are copied every step there).

The sampler and the train step do not run at once: the total is the persistent terms (params,
optimizer, teacher, reference) plus the larger of the two phases (sampling: KV cache and
decode weights; training: everything else). An unrolled stack (`scan_layers=False`) is planned
as remat="none": XLA may undo the rematerialization of an unrolled loop (it does on CPU), so
only the scan's is counted on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import jax
import numpy as np
import optax

from jaxpost import lora, models, plan_step, sharding, train
from jaxpost.errors import UserError
from jaxpost.models import ModelConfig
from jaxpost.models.configs import REMAT
from jaxpost.plan_step import OBJECTIVES
from jaxpost.plan_terms import (  # noqa: F401  (Plan, check_fits, GiB: this module's API)
    ARGUMENTS,
    PERSISTENT,
    PLATFORMS,
    SAMPLING,
    TEMPORARIES,
    GiB,
    Plan,
    abstract_mesh,
    block_backward_per_token,
    check_fits,
    fsdp_gathered,
    local_shape,
    local_size,
    saved_per_token,
    shard_elements,
    tree_bytes,
    weight_copies,
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
    seq_len: int | None = None,
    objective: str = "sft",
    loss_impl: str = "materialized",
    prompt_len: int | None = None,
    completion_len: int | None = None,
    teacher_config: ModelConfig | None = None,
    teacher_prompt_len: int | None = None,
    with_reference: bool = False,
    distill_loss=None,
    optimizer="adamw",
    remat: str | None = None,
    sample_batch: int | None = None,
    device_memory_bytes: int | None = None,
    devices: int | None = None,
    grad_accum: int = 1,
    platform: str | None = None,
    lora_rank: int = 0,
) -> Plan:
    """Estimate per-device bytes of a training run on a (data, fsdp, tensor) mesh.

    Args:
      config: the student. Its `remat`, `scan_layers`, `dtype` and `param_dtype` are honoured.
      mesh_shape: as for `sharding.make_mesh` ("1,8,1", "fsdp=8", (1, 8, 1), dict).
      batch: global rows per step: SFT sequences; GRPO and OPD completions (prompts x
        group_size); must divide by data x fsdp (x grad_accum).
      seq_len: SFT's tokens per sequence, L.
      objective: "sft", "grpo" or "opd": the step `train.make_step` builds from
        `train.sft_objective`, `grpo_objective` or `opd_objective`.
      loss_impl: a `train.LOSS_IMPLS` name, resolved as the objective resolves it ("auto":
        fused_linear at V >= train.FUSED_MIN_VOCAB).
      prompt_len, completion_len: GRPO and OPD: the padded prompt width P and completion
        width M (max_new_tokens) of the `data.CompletionBatch`.
      teacher_config: OPD's teacher (its parameters are a frozen input of the step).
      teacher_prompt_len: OPD: the width Pt of the teacher's (privileged) prompt; default P.
      with_reference: GRPO with a frozen reference policy (the KL term): its parameters are an
        input and its logprobs are computed in the step.
      distill_loss: OPD's loss (`losses.opd_kl(alpha)`, `entropy_aware_opd_kl`, `prefix_opd`);
        default `opd_kl(1.0)`. Only its kind and α matter here.
      optimizer: "adamw", "sgd" or an optax transformation (its state is `eval_shape`d).
      remat: override `config.remat` ("none", "full", "dots", "attn").
      sample_batch: rows the sampler decodes at once (adds its KV cache, L = seq_len or P + M
        slots); None: no sampling.
      device_memory_bytes: per-device capacity; None: `fits` is always True.
      devices: device count the mesh must multiply to (default: the product of its sizes).
      grad_accum: micro-batches per step; activations are those of one micro-batch.
      platform: "cpu", "gpu" or "tpu" (default: this process's backend): how XLA stores
        16-bit activations (`plan_terms.activation_itemsize`).
      lora_rank: > 0: the step trains low-rank adapters of every projection (`jaxpost.lora`):
        the optimizer state is the adapters' (replicated), `adapters` holds them, the update
        touches only them, and `merged_weights` is the step's merged copy of the weights (the
        base stays `params`; the merged weights' gradient still forms in the backward).

    Raises `UserError` (a ValueError), before anything is compiled, for a mesh that does not
    multiply to the device count, an unknown axis name, a batch not divisible by the
    data-parallel size, an unknown objective, loss path or remat policy, or widths the
    objective does not take (seq_len for SFT; prompt_len and completion_len on-policy).
    """
    remat = config.remat if remat is None else remat
    if remat not in REMAT:
        raise UserError(f"unknown remat policy {remat!r}; use one of {REMAT}")
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    if (teacher_config is None) != (objective != "opd"):
        raise UserError("objective 'opd' needs teacher_config; the other objectives take none")
    platform = jax.default_backend() if platform is None else platform
    if platform not in PLATFORMS:
        raise UserError(f"unknown platform {platform!r}; use one of {PLATFORMS}")
    if batch < 1 or grad_accum < 1:
        raise UserError("batch and grad_accum must be >= 1")
    impl = plan_step.resolve_impl(objective, loss_impl, config, distill_loss)
    mesh = abstract_mesh(mesh_shape, devices)
    dp = sharding.data_parallel_size(mesh)
    if batch % (dp * grad_accum):
        raise UserError(
            f"batch {batch} is not divisible by the data-parallel size {dp} (data "
            f"{mesh.shape['data']} x fsdp {mesh.shape['fsdp']}) times grad_accum {grad_accum}"
        )
    rows = batch // dp // grad_accum  # sequences per device per micro-batch
    step = plan_step.step_shape(objective, impl, rows, seq_len=seq_len, prompt_len=prompt_len,
                                completion_len=completion_len,
                                teacher_prompt_len=teacher_prompt_len,
                                with_reference=with_reference, distill_loss=distill_loss)  # fmt: skip
    for who, cfg, length in (("model's", config, step.length),
                             ("teacher's", teacher_config, step.teacher_length)):  # fmt: skip
        if cfg is not None and length > cfg.max_seq_len:
            raise UserError(f"a sequence of {length} tokens exceeds the {who} max_seq_len "
                            f"{cfg.max_seq_len}")  # fmt: skip
    if teacher_config is not None and teacher_config.vocab_size != config.vocab_size:
        raise UserError(f"teacher and student vocabularies differ ({teacher_config.vocab_size} "
                        f"vs {config.vocab_size})")  # fmt: skip
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
    x = local_shape(config, mesh, rows * step.length, step.length, platform)
    skip = plan_step.head_param_names(config, step.fused)
    terms = {
        "params": params,
        "optimizer": opt,
        "batch": plan_step.batch_bytes(step),
        "gradients": params,
        "gathered_weights": gathered_bytes,
        "weight_copies": weight_copies(config, abstract, param_sh, gathered_extra, x.s, skip),
        "activations": config.n_layers * x.T * saved_per_token(x, remat),
    }
    loss = plan_step.loss_peak(step, x, config.vocab_size)
    frozen = teacher_config if objective == "opd" else config if with_reference else None
    head_copy = 0  # what the fused sweep holds of the heads beyond its tiles
    if step.fused:
        head_copy, sweep = plan_step.fused_head_bytes(config, mesh, platform, gradient=True)
        loss += head_copy + sweep
        if objective == "opd":
            loss += sum(plan_step.fused_head_bytes(teacher_config, mesh, platform,
                                                   gradient=False))  # fmt: skip
    else:
        loss += plan_step.materialized_head_bytes(config, mesh)
    block = x.T * block_backward_per_token(x)
    terms["backward_peak"] = max(loss, block)
    knobs = {}
    if loss > block:
        notes.append("the loss is the step's transient peak (backward_peak), not a block")
        fused = "" if step.fused else 'loss_impl="fused_linear" (no [N, M, V] logits), '
        knobs["backward_peak"] = f"{fused}a smaller per-device batch (or grad_accum), or shorter " \
            "completions"  # fmt: skip
    if frozen is not None:
        frozen_sh = sharding.param_shardings(frozen, mesh)
        terms["teacher" if objective == "opd" else "reference"] = tree_bytes(
            models.abstract_params(frozen), frozen_sh
        )
        length = step.teacher_length or step.length
        phase = plan_step.frozen_forward(frozen, mesh, rows * length, length, platform)
        phase += head_copy
        # The frozen forward runs before the backward: it counts by what it exceeds the
        # backward's gradients and peak, which it never meets.
        terms["frozen_forward"] = max(0, phase - terms["gradients"] - terms["backward_peak"])
    # The update computes the new parameters and optimizer state beside the old ones (a
    # non-finite step keeps the old), after the activations are freed.
    update = terms["gradients"] + params + opt
    if lora_rank < 0:
        raise UserError(f"lora_rank must be >= 0, got {lora_rank}")
    if lora_rank:
        adapters = lora.abstract(abstract, lora.LoraConfig(rank=lora_rank))
        raw = lambda tree: sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize  # noqa: E731
                               for x in jax.tree.leaves(tree))  # fmt: skip
        terms["adapters"] = raw(adapters)
        terms["optimizer"] = raw(jax.eval_shape(tx.init, adapters))
        terms["merged_weights"] = params
        update = 2 * terms["adapters"] + terms["optimizer"]
    terms["update"] = max(0, update - sum(terms[k] for k in TEMPORARIES if k in terms))
    if sample_batch is not None:
        if sample_batch < 1:
            raise UserError(f"sample_batch must be >= 1, got {sample_batch}")
        cache_sh = sharding.cache_shardings(config, mesh, sample_batch, capacity=step.length)
        k_shape, v_shape = models.cache_shapes(config, sample_batch, step.length)
        b = np.dtype(config.compute_dtype).itemsize
        kv = (math.prod(cache_sh.k[0].shard_shape(k_shape))
              + math.prod(cache_sh.v[0].shard_shape(v_shape))) * b  # fmt: skip
        terms["kv_cache"] = config.n_layers * kv
        if platform == "cpu":  # the sampler's per-layer slices of the stacked weights
            layers = {"layers": abstract["layers"]}
            terms["decode_weights"] = tree_bytes(layers, {"layers": param_sh["layers"]})
    persistent = sum(terms.get(k, 0) for k in PERSISTENT)
    train_phase = sum(v for k, v in terms.items() if k not in PERSISTENT + SAMPLING)
    sample_phase = sum(terms.get(k, 0) for k in SAMPLING)
    if sample_phase > train_phase:
        notes.append("the sampling phase (KV cache) is the peak, not the train step")
    return Plan(terms=terms, total=persistent + max(train_phase, sample_phase),
                device_memory_bytes=device_memory_bytes, mesh=dict(mesh.shape),
                notes=tuple(notes), objective=objective, loss_impl=impl, knobs=knobs)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Command line (jaxpost.plan_cli)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxpost.plan ...`: print the plan's table and JSON line (`jaxpost.plan_cli`)."""
    from jaxpost import plan_cli

    return plan_cli.main(sys.argv[1:] if argv is None else argv, plan)


if __name__ == "__main__":
    sys.exit(main())
