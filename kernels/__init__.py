"""Fused teacher–student divergences over a large vocabulary (JAX / Pallas).

    generalized_jsd(student_logits [N, V], teacher_logits [N, V], *, alpha, temperature, mask, impl)
    fused_linear_jsd(student_hidden [N, D], student_head [D, V], teacher, *, alpha, ...)

Both return per-row divergences ``[N]`` (float32) and are differentiable in the student side
only. ``IMPLS`` names the implementations; ``reference`` holds float64 NumPy references.
This package imports only jax and numpy.
"""

from kernels.config import DEFAULT_BLOCK_SIZES, IMPLS, BlockSizes
from kernels.fused_linear import fused_linear_jsd
from kernels.jsd import (
    default_impl,
    generalized_jsd,
    generalized_jsd_reference,
    set_poison_outputs,
)

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "IMPLS",
    "BlockSizes",
    "default_impl",
    "fused_linear_jsd",
    "generalized_jsd",
    "generalized_jsd_reference",
    "set_poison_outputs",
]
