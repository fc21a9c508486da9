"""What the objective adds to the planned train step: its shape (which tokens go through the
layers, which rows through the LM head), its loss's peak on each loss path, and the forward of a
frozen model (GRPO's reference, OPD's teacher). `jaxpost.plan` sums these with the layers'
terms of `jaxpost.plan_terms`; its docstring states every formula.

Per device, with `rows` sequences (completions) of one micro-batch:

  objective  model tokens T      attention S    head rows R              frozen forward
  sft        rows · L            L = seq_len    rows · L (fused: L − 1)  none
  grpo       rows · (P + M)      P + M          rows · M                 reference (optional)
  opd        rows · (P + M)      P + M          rows · M                 teacher, rows · (Pt + M)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxpost import models, sharding, train
from jaxpost.errors import UserError
from jaxpost.models import ModelConfig
from jaxpost.plan_terms import (
    LocalShape,
    activation_itemsize,
    forward_per_token,
    fsdp_gathered,
    local_shape,
    weight_copies,
)

OBJECTIVES = ("sft", "grpo", "opd")
BLOCK_VOCAB = 4096  # the fused-linear ops' default columns per block (kernels.DEFAULT_BLOCK_SIZES)

# [R, V] float32 arrays live at once at the materialized loss's peak, by objective (read off
# XLA:CPU's buffer assignment of the 0.5B steps, 2-core CPU, 2026-12-02, and checked against
# their temp bytes in benchmarks/kernels.md): SFT's logits, their
# log-softmax, its cotangent and that cotangent's transpose for the head's gradient; GRPO the
# logits of the M completion slots, one log-softmax, its cotangent (a reference adds its own
# logits); OPD both models' logits, both log-softmaxes, the student logits' cotangent.
MATERIALIZED_ARRAYS = {"sft": 4, "grpo": 3, "opd": 5}
# OPD's other dense divergences hold more (fitted to the 0.5B shape's steps at 4 layers, same
# machine and day): forward KL one array more than reverse KL, the entropy-aware mix (both
# directions) two, the generalized JSD (the mixture and its log) three. A `kernels` D_α (the
# "xla" loss path) reads the logits in row blocks and writes their gradient: 3.3 to 3.5
# arrays measured, OPD_KERNEL_ARRAYS counted; "pallas_*" are planned as "xla" (on CPU they
# only interpret, so their compiled temporaries are not measured here).
OPD_DENSE_EXTRA = {"reverse_kl": 0, "forward_kl": 1, "entropy_aware": 2, "jsd": 3}
OPD_KERNEL_ARRAYS = 3
# [R, block] float32 tiles the fused sweeps hold at once in the step (XLA:CPU's live ranges of
# the tiny steps, same machine and day): SFT's logprobs 2, GRPO's with the entropy 3, OPD's
# divergence, which also forms the teacher's block logits, 4.
FUSED_TILES = {"sft": 2, "grpo": 3, "opd": 4}


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The objective's share of one device's step.

    objective: "sft", "grpo" or "opd". impl: the loss path as it runs ("materialized",
    "fused_linear", or for OPD a `kernels` divergence over materialized logits: "xla",
    "pallas_gpu", "pallas_tpu"). rows: sequences per device and micro-batch. length: slots of a
    student sequence (L, or P + M). head_rows: R. teacher_length: Pt + M (OPD) else 0.
    with_reference: GRPO's frozen reference forward. divergence: OPD's loss, "reverse_kl"
    (opd_kl(1), the default), "forward_kl" (α = 0), "jsd" (0 < α < 1) or "entropy_aware".
    """

    objective: str
    impl: str
    rows: int
    length: int
    head_rows: int
    teacher_length: int = 0
    with_reference: bool = False
    divergence: str = "reverse_kl"

    @property
    def fused(self) -> bool:
        return self.impl == "fused_linear"


def resolve_impl(objective: str, loss_impl: str, config: ModelConfig, distill_loss) -> str:
    """The path `train.*_objective(..., loss_impl)` runs: "auto" by the vocabulary
    (`train.resolve_loss_impl`); a kernel name means materialized logits for SFT and GRPO (they
    have no divergence) and a kernel D_α over materialized logits for OPD, as `opd_objective`
    does (an entropy-aware loss has no such kernel and runs dense)."""
    impl = train.resolve_loss_impl(loss_impl, config)
    if impl in train.KERNEL_IMPLS and (
        objective != "opd" or _divergence(distill_loss) == "entropy_aware"
    ):
        return "materialized"
    return impl


def _divergence(distill_loss) -> str:
    if distill_loss is None:
        return "reverse_kl"
    kind, alpha = getattr(distill_loss, "kind", None), getattr(distill_loss, "alpha", None)
    if kind is None:
        raise UserError(f"distill_loss must be an OPD loss built by jaxpost.opd (opd_kl, "
                        f"entropy_aware_opd_kl, prefix_opd), got {distill_loss!r}")  # fmt: skip
    if kind == "entropy_aware":
        return "entropy_aware"
    return {1.0: "reverse_kl", 0.0: "forward_kl"}.get(alpha, "jsd")


def step_shape(objective: str, impl: str, rows: int, *, seq_len, prompt_len, completion_len,
               teacher_prompt_len, with_reference: bool, distill_loss) -> StepShape:  # fmt: skip
    """Checks the widths an objective needs (UserError naming the missing one) and builds the
    StepShape; `impl` is already resolved."""
    if objective == "sft":
        if seq_len is None or seq_len < 2:
            raise UserError("objective 'sft' needs seq_len >= 2 (tokens per sequence)")
        if prompt_len is not None or completion_len is not None or with_reference:
            raise UserError("objective 'sft' takes seq_len; prompt_len, completion_len and "
                            "with_reference are for 'grpo' and 'opd'")  # fmt: skip
        head = rows * (seq_len - 1 if impl == "fused_linear" else seq_len)
        return StepShape("sft", impl, rows, seq_len, head)
    if prompt_len is None or completion_len is None or prompt_len < 1 or completion_len < 1:
        raise UserError(f"objective {objective!r} needs prompt_len >= 1 (P, the padded prompt "
                        f"width) and completion_len >= 1 (M, max_new_tokens)")  # fmt: skip
    if seq_len is not None:
        raise UserError(f"objective {objective!r} takes prompt_len and completion_len, not seq_len")
    if with_reference and objective != "grpo":
        raise UserError("with_reference is GRPO's frozen reference policy (objective 'grpo')")
    if objective == "grpo" and (teacher_prompt_len is not None or distill_loss is not None):
        raise UserError("teacher_prompt_len and distill_loss are for objective 'opd'")
    teacher_len = 0
    if objective == "opd":
        pt = prompt_len if teacher_prompt_len is None else teacher_prompt_len
        if pt < 1:
            raise UserError(f"teacher_prompt_len must be >= 1, got {pt}")
        teacher_len = pt + completion_len
    return StepShape(objective, impl, rows, prompt_len + completion_len, rows * completion_len,
                     teacher_len, with_reference, _divergence(distill_loss))  # fmt: skip


def loss_peak(step: StepShape, x: LocalShape, global_vocab: int) -> int:
    """Bytes the loss holds at its peak, beyond the layers' saved activations.

    Materialized: k float32 [R, V] arrays (`MATERIALIZED_ARRAYS`, plus one for a GRPO
    reference's logits, `OPD_DENSE_EXTRA` for the other dense divergences, or
    `OPD_KERNEL_ARRAYS` for a kernel D_α). Fused: the sweep's float32 [R, w] tiles,
    w = min(V, BLOCK_VOCAB) (the head's vocabulary is gathered for the sweep when tensor
    parallelism splits it), and the float32 [R, D] accumulator of the hidden states' gradient.
    """
    R, V = step.head_rows, x.V
    if step.fused:
        tiles = FUSED_TILES[step.objective]
        return tiles * R * min(global_vocab, BLOCK_VOCAB) * 4 + R * x.D * 4
    if step.objective == "opd" and step.impl != "materialized":
        return OPD_KERNEL_ARRAYS * R * V * 4
    k = MATERIALIZED_ARRAYS[step.objective] + int(step.with_reference)
    if step.objective == "opd":
        k += OPD_DENSE_EXTRA[step.divergence]
    return k * R * V * 4


def materialized_head_bytes(config: ModelConfig, mesh) -> int:
    """Two head-sized buffers in the storage dtype beside the materialized loss's [R, V]
    arrays: the head's gradient, written while the logits' cotangent lives, and one more of its
    size (read off XLA:CPU's buffer assignment: the gradient's transpose or the lookup's)."""
    name = "embed" if config.tie_embeddings else "lm_head"
    head = models.abstract_params(config)[name]
    shard = sharding.param_shardings(config, mesh)[name].shard_shape(head.shape)
    return 2 * math.prod(shard) * np.dtype(head.dtype).itemsize


def fused_head_bytes(config: ModelConfig, mesh, platform: str, *,
                     gradient: bool) -> tuple[int, int]:  # fmt: skip
    """(converted copy, sweep buffers): what a fused sweep holds of one model's head beyond its
    tiles. The copy: where the matmuls see the head in another dtype (`weight_copies`' rule:
    XLA:CPU computes bfloat16 in float32), the head converted once, before the sweep (XLA hoists
    it ahead of the frozen forward too). The sweep's: with tensor parallelism the head gathered
    over its vocabulary axis ([V, D / fsdp], storage dtype) and, for the student (`gradient`),
    the head's gradient carried through the sweep as a whole float32 [V, D] per device and
    reduced after it (benchmarks/kernels.md, "On a mesh"); without, the gradient's carry and its
    copy out of the loop, two head-sized buffers in the storage dtype."""
    name = "embed" if config.tie_embeddings else "lm_head"
    head = models.abstract_params(config)[name]
    shard = sharding.param_shardings(config, mesh)[name].shard_shape(head.shape)
    vocab_axis = 0 if name == "embed" else 1
    whole = list(shard)
    whole[vocab_axis] = head.shape[vocab_axis]
    seen = math.prod(whole)  # the head as the sweep reads it: vocabulary gathered
    itemsize = np.dtype(head.dtype).itemsize
    if tuple(whole) != tuple(shard):
        sweep = seen * itemsize + (math.prod(head.shape) * 4 if gradient else 0)
    else:
        sweep = 2 * seen * itemsize if gradient else 0
    s = activation_itemsize(config, platform)
    copies = config.dtype != config.param_dtype or s != np.dtype(config.weight_dtype).itemsize
    return (seen * s if copies else 0), sweep


def frozen_forward(config: ModelConfig, mesh, tokens: int, length: int, platform: str) -> int:
    """A frozen model's forward phase (no gradient, nothing saved for a backward): its
    fsdp-gathered weights and converted copies (`fsdp_gathered`, `weight_copies`, the head
    included) and one block's forward at a time (`forward_per_token` at its own length)."""
    abstract = models.abstract_params(config)
    param_sh = sharding.param_shardings(config, mesh)
    extra, gathered = fsdp_gathered(abstract, param_sh, config, False)
    x = local_shape(config, mesh, tokens, length, platform)
    copies = weight_copies(config, abstract, param_sh, extra, x.s)
    return gathered + copies + tokens * forward_per_token(x)


def head_param_names(config: ModelConfig, fused: bool) -> tuple[str, ...]:
    """Parameters the matmuls never see whole in the compute dtype: the embedding table is only
    gathered from (the lookup and its gather-built gradient) unless it is the head of the
    materialized path; on the fused path the head is cast block by block inside the sweep."""
    if config.tie_embeddings:
        return ("embed",) if fused else ()
    return ("embed", "lm_head") if fused else ("embed",)


def batch_bytes(step: StepShape) -> int:
    """The step's batch on one device: SFT 3 int32 [rows, L]; on-policy the prompt and
    completion with their masks, old and sampling logprobs [rows, M] (float32), GRPO's
    advantages [rows], an OPSD teacher prompt and its mask."""
    if step.objective == "sft":
        return 3 * step.rows * step.length * 4
    M = step.head_rows // step.rows
    per_row = 2 * step.length + 2 * M + (1 if step.objective == "grpo" else 0)
    if step.objective == "opd" and step.teacher_length != step.length:
        per_row += 2 * (step.teacher_length - M)
    return step.rows * per_row * 4
