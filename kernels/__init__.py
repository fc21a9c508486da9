"""Fused teacher–student divergences over a large vocabulary (JAX / Pallas).

    generalized_jsd(student_logits [N, V], teacher_logits [N, V], *, alpha, temperature, mask, impl)
    fused_linear_jsd(student_hidden [N, D], student_head [D, V], teacher, *, alpha, ...)
    fused_linear_kl_pair(student_hidden, student_head, teacher, *, temperature, mask, ...)
    fused_linear_logprobs(hidden [N, D], head [D, V], targets [N], *, temperature, mask, ...)
    fused_linear_topk(hidden, head, k) / fused_linear_bucket_logprobs(hidden, head, idx)
        a top-k teacher (k ids, their logprobs, a tail bucket) and the student's matching buckets

The divergences return per-row ``[N]`` float32 (the pair op: KL(p_S‖p_T), KL(p_T‖p_S) and the
teacher's entropy in one sweep) and are differentiable in the student side only;
fused_linear_logprobs returns log softmax(hW/τ)[y] per row (SFT cross-entropy, GRPO token
logprobs), optionally with the entropy and the argmax hit. The fused_linear ops never form
``[N, V]`` logits, forward or backward. ``IMPLS`` names the implementations; ``reference``
holds float64 NumPy references. This package imports only jax and numpy.
"""

from kernels.config import DEFAULT_BLOCK_SIZES, IMPLS, BlockSizes
from kernels.fused_linear import fused_linear_jsd
from kernels.fused_linear_logprobs import (
    TokenLogprobs,
    fused_linear_logprobs,
    fused_linear_logprobs_reference,
)
from kernels.fused_linear_pair import KLPair, fused_linear_kl_pair
from kernels.fused_linear_topk import (
    TopK,
    bucket_divergence,
    bucket_logprobs_from_logits,
    fused_linear_bucket_logprobs,
    fused_linear_topk,
    topk_from_logits,
)
from kernels.jsd import (
    default_impl,
    generalized_jsd,
    generalized_jsd_reference,
    set_poison_outputs,
)
from kernels.linear_blocks import HEAD_LAYOUTS

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "HEAD_LAYOUTS",
    "IMPLS",
    "BlockSizes",
    "KLPair",
    "TokenLogprobs",
    "TopK",
    "bucket_divergence",
    "bucket_logprobs_from_logits",
    "fused_linear_bucket_logprobs",
    "fused_linear_topk",
    "topk_from_logits",
    "default_impl",
    "fused_linear_jsd",
    "fused_linear_kl_pair",
    "fused_linear_logprobs",
    "fused_linear_logprobs_reference",
    "generalized_jsd",
    "generalized_jsd_reference",
    "set_poison_outputs",
]
