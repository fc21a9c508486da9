"""`scripts/bench_kernels.py --topk`: a top-k teacher's memory against the full vocabulary's
(the programs and fields are described in bench_kernels.py's docstring)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels


def _topk_programs(vocab: int, rows: int, width: int, k: int, dtype):
    """{(stage, impl): (function, abstract inputs, index of the teacher scores in the inputs
    or None when they are the output)}."""
    struct = jax.ShapeDtypeStruct
    h, w = struct((rows, width), dtype), struct((width, vocab), dtype)
    logits = struct((rows, vocab), jnp.float32)
    top = kernels.TopK(struct((rows, k), jnp.int32), struct((rows, k), jnp.float32),
                       struct((rows,), jnp.float32))  # fmt: skip

    def full_scores(th, tw):
        return jnp.dot(th, tw, preferred_element_type=jnp.float32)

    def topk_scores(th, tw):
        return kernels.fused_linear_topk(th, tw, k)

    def full_step(sh, sw, t):
        return kernels.fused_linear_jsd(sh, sw, t, alpha=1.0).mean()

    def topk_step(sh, sw, t):
        student = kernels.fused_linear_bucket_logprobs(sh, sw, t.idx)
        return kernels.bucket_divergence(student, t.buckets(), 1.0).mean()

    grad = lambda f: jax.value_and_grad(f, argnums=(0, 1))  # noqa: E731
    return {("scoring", "full"): (full_scores, (h, w), None),
            ("scoring", "topk"): (topk_scores, (h, w), None),
            ("student_step", "full"): (grad(full_step), (h, w, logits), 2),
            ("student_step", "topk"): (grad(topk_step), (h, w, top), 2)}  # fmt: skip


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def bench_topk(args, emit) -> None:
    dtype = jnp.dtype(args.dtype)
    for vocab in args.vocab:
        programs = _topk_programs(vocab, args.rows, args.width, args.k, dtype)
        full_total = {}
        for (stage, impl), (fn, inputs, teacher_at) in programs.items():
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*inputs).compile()
            stats = compiled.memory_analysis()
            if teacher_at is None:
                teacher = int(stats.output_size_in_bytes)
            else:
                teacher = _nbytes(inputs[teacher_at])
            temp = int(stats.temp_size_in_bytes)
            total = teacher + temp
            full_total.setdefault(stage, total)
            emit(bench="topk_teacher", stage=stage, impl=impl, N=args.rows, D=args.width,
                  V=vocab, k=args.k, dtype=args.dtype, teacher_bytes=teacher, temp_bytes=temp,
                  ratio_to_full=round(total / full_total[stage], 5),
                  backend=jax.default_backend(),
                  compile_s=round(time.perf_counter() - start, 1))  # fmt: skip
