"""Per-token OPD divergences on each path a loss can take (`jaxpost.opd` aggregates them).

  * `dense_kl_pair`: both KL directions and the teacher's entropy from materialized logits,
    dense `jnp` (the entropy-aware loss's formula; D_α's dense form is `opd.generalized_jsd`).
  * `materialized_divergence`: logits [B, L, V] already exist; `kernels.generalized_jsd(impl=)`
    computes D_α per row without holding [N, V] probabilities (under a mesh a Pallas kernel runs
    per device, inside `jax.shard_map`).
  * `hidden_divergence`: only the final hidden states and the LM heads exist;
    `kernels.fused_linear_jsd` / `fused_linear_kl_pair` sweep the vocabulary in blocks, forward
    and backward, so neither model's [B, L, V] logits are ever formed.

`kernels` is imported inside the functions: it is an optional sibling package, and jaxpost must
import without it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def check_logits(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, mask_BxL: jax.Array) -> None:
    """Raise ValueError unless both logits are [B, L, V] of one shape and the mask [B, L]."""
    if student_BxLxV.ndim != 3 or teacher_BxLxV.ndim != 3:
        raise ValueError(
            f"expected logits [B, L, V]; got student {student_BxLxV.shape}, "
            f"teacher {teacher_BxLxV.shape}"
        )
    if student_BxLxV.shape[-1] != teacher_BxLxV.shape[-1]:
        raise ValueError(
            f"teacher and student vocabularies differ (teacher V={teacher_BxLxV.shape[-1]}, "
            f"student V={student_BxLxV.shape[-1]}); token-level distillation needs one vocabulary"
        )
    if student_BxLxV.shape != teacher_BxLxV.shape:
        raise ValueError(
            f"student logits {student_BxLxV.shape} and teacher logits {teacher_BxLxV.shape} must "
            "cover the same [B, L] positions (see align_completion for OPSD)"
        )
    if mask_BxL.shape != student_BxLxV.shape[:2]:
        raise ValueError(f"mask {mask_BxL.shape} must be [B, L] = {student_BxLxV.shape[:2]}")


def dense_kl_pair(student_BxLxV, teacher_BxLxV, temperature: float):
    """(KL(p_S ‖ p_T), KL(p_T ‖ p_S), H(p_T)) over the last axis, p = softmax(logits / τ).

    Dense: log-softmaxes of both are materialized. Every p·log p term is "double where"
    guarded (`kernels.jsd.kl_from_logprobs`), so 0·log 0 = 0 in value and gradient.
    """
    from kernels import jsd

    logp_s = jax.nn.log_softmax(student_BxLxV / temperature, axis=-1)
    logp_t = jax.nn.log_softmax(teacher_BxLxV / temperature, axis=-1)
    support = logp_t > -jnp.inf
    safe = jnp.where(support, logp_t, 0)
    entropy = -jnp.where(support, jnp.exp(safe) * safe, 0).sum(-1)
    return jsd.kl_from_logprobs(logp_s, logp_t), jsd.kl_from_logprobs(logp_t, logp_s), entropy


def materialized_divergence(student_BxLxV, teacher_BxLxV, mask_BxL, alpha: float,
                            temperature: float, impl: str) -> jax.Array:  # fmt: skip
    """Per-position D_α [B, L] by `kernels.generalized_jsd(impl=impl)`; the teacher detached.

    The logits are passed as they are (zeroing padded rows would cost the [N, V] copy the kernel
    exists to avoid): the kernel's `mask` keeps padded rows out of its value and backward.
    """
    import kernels

    b, l, v = student_BxLxV.shape

    def divergence(student_NxV, teacher_NxV, mask_N):
        return kernels.generalized_jsd(student_NxV, teacher_NxV, alpha=alpha,
                                       temperature=temperature, mask=mask_N, impl=impl,
                                       interpret=interpret_pallas(impl))  # fmt: skip

    mesh = jax.sharding.get_abstract_mesh()
    if impl.startswith("pallas") and not mesh.empty and mesh.size > 1:
        if mesh.explicit_axes:
            raise ValueError(
                f"the Pallas OPD kernels run per device under a mesh with Auto axes (jaxpost's "
                f"`sharding.make_mesh`); this mesh has Explicit axes {mesh.explicit_axes}"
            )
        if not mesh.are_all_axes_manual:  # inside a caller's shard_map nothing is left to split
            divergence = _rowwise_shard_map(divergence, mesh, b * l)
    div_N = divergence(
        student_BxLxV.reshape(b * l, v),
        jax.lax.stop_gradient(teacher_BxLxV).reshape(b * l, v),
        mask_BxL.reshape(b * l),
    )
    return div_N.reshape(b, l)


def interpret_pallas(impl: str) -> bool:
    """Whether a Pallas OPD loss runs in the Pallas interpreter: jaxpost's choice is yes on a
    CPU, where no Pallas kernel compiles (so tests and CPU runs still exercise the kernel's own
    code), and compiled everywhere else (a kernel foreign to the backend is then a clear error).
    The kernels leave this choice to their caller."""
    return impl.startswith("pallas") and jax.default_backend() == "cpu"


def _rowwise_shard_map(divergence, mesh, rows: int):
    """Run a Pallas divergence on each device's own rows, under `jax.shard_map`.

    A Pallas kernel is an opaque custom call: XLA's SPMD partitioner cannot split it, and a
    Mosaic (TPU) kernel in a multi-device program is an error unless every mesh axis is manual.
    Rows are independent, so each device takes a contiguous block of rows: the mesh axes (those
    not already manual, when called inside a caller's shard_map) are used in order (data, fsdp,
    tensor) while their product divides `rows` (the batch axes always do: loops refuse a batch
    that does not split over them); an axis left out holds the same rows on each of its
    devices. The vocabulary is whole inside a shard: where the logits were split by vocabulary
    (tensor > 1) they are gathered first, so each device holds [rows / shards, V] logits, the
    layout of the model's own logits without tensor parallelism.
    """
    free = [name for name in mesh.axis_names if name not in mesh.manual_axes]
    axes, size = [], 1
    for name in free:
        if mesh.shape[name] > 1 and rows % (size * mesh.shape[name]) == 0:
            axes.append(name)
            size *= mesh.shape[name]
    split = tuple(axes) or None
    return jax.shard_map(divergence, mesh=mesh, in_specs=(P(split, None), P(split, None), P(split)),
                         out_specs=P(split), axis_names=frozenset(free), check_vma=False)  # fmt: skip


class HiddenDivergence(NamedTuple):
    """Per-position results of `hidden_divergence`, each [B, L] float32 (0 at masked positions).

    divergence: D_α for kind "kl"; KL(p_S ‖ p_T) for "pair" (differentiable in the student).
    forward_kl: KL(p_T ‖ p_S) for "pair", else None (differentiable in the student).
    teacher_entropy: H(p_T) for "pair", else None (a constant).
    """

    divergence: jax.Array
    forward_kl: jax.Array | None = None
    teacher_entropy: jax.Array | None = None


def hidden_divergence(kind: str, student_hidden_BxLxD, student_head, teacher_hidden_BxLxDt,
                      teacher_head, mask_BxL, *, alpha: float = 1.0, temperature: float = 1.0,
                      head_layout: str = "DV", teacher_head_layout: str = "DV",
                      compute_dtype=None, block_sizes=None) -> HiddenDivergence:  # fmt: skip
    """Divergences straight from hidden states and heads: no [B, L, V] logits, either model.

    kind "kl": `kernels.fused_linear_jsd` (D_α); kind "pair": `kernels.fused_linear_kl_pair`
    (both KL directions and the teacher's entropy in one sweep, for entropy-aware OPD). The
    teacher side is wrapped in `stop_gradient`. Heads are [D, V] ("DV") or a tied model's
    [V, D] embedding table as stored ("VD"); `compute_dtype` is each block matmul's operand dtype.
    """
    import kernels

    if student_hidden_BxLxD.ndim != 3 or teacher_hidden_BxLxDt.ndim != 3:
        raise ValueError(f"expected hidden states [B, L, D]; got student "
                         f"{student_hidden_BxLxD.shape}, teacher {teacher_hidden_BxLxDt.shape}")  # fmt: skip
    b, l, _ = student_hidden_BxLxD.shape
    if teacher_hidden_BxLxDt.shape[:2] != (b, l):
        raise ValueError(
            f"student hidden {student_hidden_BxLxD.shape} and teacher hidden "
            f"{teacher_hidden_BxLxDt.shape} must cover the same [B, L] positions"
        )
    if mask_BxL.shape != (b, l):
        raise ValueError(f"mask {mask_BxL.shape} must be [B, L] = {(b, l)}")
    flat = lambda x: x.reshape(b * l, x.shape[-1])  # noqa: E731
    teacher = (jax.lax.stop_gradient(flat(teacher_hidden_BxLxDt)),
               jax.lax.stop_gradient(teacher_head))  # fmt: skip
    kw = dict(temperature=temperature, mask=mask_BxL.reshape(b * l), block_sizes=block_sizes,
              head_layout=head_layout, teacher_head_layout=teacher_head_layout,
              compute_dtype=compute_dtype)  # fmt: skip
    hidden = flat(student_hidden_BxLxD)
    if kind == "kl":
        div = kernels.fused_linear_jsd(hidden, student_head, teacher, alpha=alpha, **kw)
        return HiddenDivergence(div.reshape(b, l))
    if kind != "pair":
        raise ValueError(f"kind must be 'kl' or 'pair', got {kind!r}")
    pair = kernels.fused_linear_kl_pair(hidden, student_head, teacher, **kw)
    return HiddenDivergence(*(x.reshape(b, l) for x in pair))


__all__ = ["HiddenDivergence", "check_logits", "dense_kl_pair", "hidden_divergence", "interpret_pallas",
           "materialized_divergence"]  # fmt: skip
