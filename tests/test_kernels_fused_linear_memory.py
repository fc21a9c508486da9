"""The fused-linear ops' compiled memory does not grow with the vocabulary.

XLA's memory analysis of the jitted value-and-grad (gradients for hidden and head), with
abstract inputs, so nothing is allocated: ``temp_size_in_bytes`` is everything the program
allocates besides its arguments and outputs (the head gradient is an output). At N = 2048,
D = 64 it must be the same at V = 8192 and V = 65536, and far below the dense formula's, which
holds [N, V] logits and their gradient. Tied heads are passed as the [V, D] table with
``head_layout="VD"``: a transposed table would cost one [V, D] copy.
"""

import jax
import jax.numpy as jnp
import pytest

import kernels

N, D = 2048, 64
VOCABS = (8192, 65536)
S = jax.ShapeDtypeStruct


def _logprobs(h, w, y):
    return -kernels.fused_linear_logprobs(h, w, y).logp.mean()


def _logprobs_tied_extras(h, table, y):
    out = kernels.fused_linear_logprobs(h, table, y, head_layout="VD", with_entropy=True,
                                        with_argmax=True)  # fmt: skip
    return -out.logp.mean() + 0 * out.entropy.mean()


def _logprobs_tied_bf16(h, table, y):
    # A float32 master table read in bfloat16 block by block: no [V, D] bfloat16 copy.
    out = kernels.fused_linear_logprobs(h.astype(jnp.bfloat16), table, y, head_layout="VD",
                                        compute_dtype=jnp.bfloat16)  # fmt: skip
    return -out.logp.mean()


def _kl_pair_tied(h, table, y):
    kl = kernels.fused_linear_kl_pair(h, table, (h, table), head_layout="VD",
                                      teacher_head_layout="VD")  # fmt: skip
    return (kl.reverse_kl + kl.forward_kl).mean()


def _jsd_tied(h, table, y):
    return kernels.fused_linear_jsd(h, table, (h, table), alpha=1.0, head_layout="VD",
                                    teacher_head_layout="VD").mean()  # fmt: skip


def _dense(h, w, y):
    return -kernels.fused_linear_logprobs_reference(h, w, y).logp.mean()


# name: (loss(hidden, head, targets), head layout)
LOSSES = {
    "logprobs": (_logprobs, "DV"),
    "logprobs_tied_extras": (_logprobs_tied_extras, "VD"),
    "logprobs_tied_bf16": (_logprobs_tied_bf16, "VD"),
    "kl_pair_tied": (_kl_pair_tied, "VD"),
    "jsd_tied": (_jsd_tied, "VD"),
    "dense": (_dense, "DV"),
}


def _temp_bytes(op: str, vocab: int) -> int:
    loss, layout = LOSSES[op]
    head = S((D, vocab) if layout == "DV" else (vocab, D), jnp.float32)
    args = (S((N, D), jnp.float32), head, S((N,), jnp.int32))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.fixture(scope="module")
def dense_bytes():
    return {v: _temp_bytes("dense", v) for v in VOCABS}


@pytest.mark.parametrize("op", [op for op in LOSSES if op != "dense"])
def test_temp_memory_is_flat_in_vocab(op, dense_bytes):
    small, large = (_temp_bytes(op, v) for v in VOCABS)
    assert large <= 1.03 * small, (small, large)
    # The dense formula grows with V: [N, V] float32 logits alone are 512 MiB at V = 65536.
    assert dense_bytes[VOCABS[1]] >= 4 * N * VOCABS[1] * 3
    assert large <= 0.1 * dense_bytes[VOCABS[1]], (large, dense_bytes)
    assert small <= 0.6 * dense_bytes[VOCABS[0]], (small, dense_bytes)
