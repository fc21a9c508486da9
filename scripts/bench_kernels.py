"""Benchmarks of the fused divergence kernels; one JSON line per measurement.

    python scripts/bench_kernels.py --memory            # any backend; compiles, never allocates
    python scripts/bench_kernels.py --time              # a GPU or TPU: compiled kernels, timed
    python scripts/bench_kernels.py --step              # whole train steps; compiles only
    python scripts/bench_kernels.py --topk              # top-k vs full teacher; compiles only

--step: temporary bytes of the whole jitted train step of SFT, GRPO and OPD at Qwen2.5-0.5B's
shape, materialized vs fused-linear losses, V in {32768, 151936}, each beside the memory
planner's estimate of it (`planned_bytes`, `jaxpost.plan`), with the planner's error on the
check lines (scripts/bench_step_memory.py documents the programs and flags: --layers, --remat,
--objectives, --grpo-reference).

--memory: temporary bytes of the compiled value-and-grad of the OPD loss
    loss(h, W) = mean_n D_α(teacher_n, softmax(h_n W / τ)),   gradients for h [N, D] and W [D, V],
as reported by XLA's memory analysis (``temp_size_in_bytes``: everything the program allocates
besides its arguments and outputs; the [D, V] head gradient is an output). Three programs:
``naive`` (logits = h @ W materialized, dense log_softmax of both models), ``fused``
(materialized logits, then kernels.generalized_jsd on the xla path) and ``fused_linear``
(kernels.fused_linear_jsd: no [N, V] array anywhere). Inputs are ShapeDtypeStructs, so even
V = 151,936 at N = 8192 only compiles. ``--op`` picks the loss (one JSON line per impl and V):

    --op jsd        the OPD divergence above (default)
    --op logprobs   SFT's −mean_n log softmax(h_n W / τ)[y_n] (GRPO's token logprobs cost the
                    same): ``naive`` (materialized logits) vs kernels.fused_linear_logprobs
    --op kl_pair    entropy-aware OPD, mean_n (1 − w)·KL(p_S ‖ p_T) + w·KL(p_T ‖ p_S) with
                    w = H(p_T)/log V: ``naive``, ``two_calls`` (two fused_linear_jsd calls and
                    the teacher entropy) and ``fused_linear`` (kernels.fused_linear_kl_pair)

``--head-layout VD`` passes every head as a tied model's [V, D] embedding table.

--topk: what a top-k teacher saves (jaxpost.teachers, kernels.fused_linear_topk) at
Qwen2.5-0.5B's shape, k = 64 by default (``--k``): two programs each for the full-vocabulary
teacher and the top-k one, from compiled memory analysis. ``scoring``: the teacher's head over N
hidden states handing over its scores (full: the [N, V] float32 logits, the fused-linear path's
input; top-k: ids, logprobs and a tail, k + 1 numbers a row, swept in vocabulary blocks).
``student_step``: the value-and-grad of the student's reverse KL taking those scores as input
(full: kernels.fused_linear_jsd on teacher logits; top-k: kernels.fused_linear_bucket_logprobs
and the bucket divergence). Each line gives ``teacher_bytes`` (the scores: the scoring
program's output, the step's teacher argument), ``temp_bytes`` and ``ratio_to_full`` (teacher
bytes + temp, top-k over full).

--time: on an accelerator, compiles the backend's Pallas kernel (not interpreted), checks it
against the float64 reference on a slice, then times forward + backward of generalized_jsd at
N × V in bfloat16 for the Pallas and XLA paths, and the bandwidth floor: the bytes that must
move (read both logits in the forward, read both and write the gradient in the backward) over
the copy bandwidth measured on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bench_step_memory  # noqa: E402  (scripts/, beside this file)
import bench_topk_memory  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402


def _emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _memory_losses(alpha: float, temperature: float, teacher_kind: str, layout: str = "DV"):
    def dv(w):
        return w if layout == "DV" else w.T

    def teacher_logits(teacher):
        return teacher if teacher_kind == "logits" else teacher[0] @ dv(teacher[1])

    def naive(h, w, teacher):
        # The plain formulation (no −inf guards, which would only add temporaries).
        s = jnp.dot(h, dv(w), preferred_element_type=jnp.float32)
        lp_s = jax.nn.log_softmax(s / temperature, axis=-1)
        t = teacher_logits(teacher).astype(jnp.float32)
        lp_t = jax.nn.log_softmax(jax.lax.stop_gradient(t) / temperature, axis=-1)
        if alpha == 1.0:
            d = (jnp.exp(lp_s) * (lp_s - lp_t)).sum(-1)
        elif alpha == 0.0:
            d = (jnp.exp(lp_t) * (lp_t - lp_s)).sum(-1)
        else:
            lm = jnp.logaddexp(lp_t + jnp.log(alpha), lp_s + jnp.log1p(-alpha))
            kl_t = (jnp.exp(lp_t) * (lp_t - lm)).sum(-1)
            kl_s = (jnp.exp(lp_s) * (lp_s - lm)).sum(-1)
            d = alpha * kl_t + (1 - alpha) * kl_s
        return d.mean()

    def fused(h, w, teacher):
        s = jnp.dot(h, dv(w), preferred_element_type=jnp.float32)
        d = kernels.generalized_jsd(
            s, teacher_logits(teacher), alpha=alpha, temperature=temperature, impl="xla"
        )
        return d.mean()

    def fused_linear(h, w, teacher):
        t = teacher if teacher_kind == "logits" else tuple(teacher)
        d = kernels.fused_linear_jsd(h, w, t, alpha=alpha, temperature=temperature, impl="xla",
                                     head_layout=layout, teacher_head_layout=layout)  # fmt: skip
        return d.mean()

    return {"naive": naive, "fused": fused, "fused_linear": fused_linear}


def _logprobs_losses(temperature: float, layout: str):
    """SFT's loss −mean_n log softmax(h_n W / τ)[y_n]; GRPO's token logprobs have the same cost."""

    def naive(h, w, y):
        # What losses.sft_loss does on materialized float32 logits.
        s = jnp.dot(h, w if layout == "DV" else w.T, preferred_element_type=jnp.float32)
        lp = jax.nn.log_softmax(s / temperature, axis=-1)
        return -jnp.take_along_axis(lp, y[:, None], axis=-1).mean()

    def fused_linear(h, w, y):
        out = kernels.fused_linear_logprobs(h, w, y, temperature=temperature, head_layout=layout)
        return -out.logp.mean()

    return {"naive": naive, "fused_linear": fused_linear}


def _kl_pair_losses(temperature: float, teacher_kind: str, layout: str):
    """Entropy-aware OPD: mean_n (1 − w_n)·KL(p_S ‖ p_T) + w_n·KL(p_T ‖ p_S), w = H(p_T)/log V."""
    kw = dict(temperature=temperature, head_layout=layout, teacher_head_layout=layout)

    def teacher_arg(teacher):
        return teacher if teacher_kind == "logits" else tuple(teacher)

    def mix(rev, fwd, entropy, vocab):
        w = jax.lax.stop_gradient(entropy) / np.log(vocab)
        return ((1 - w) * rev + w * fwd).mean()

    def naive(h, w, teacher):
        dv = lambda x: x if layout == "DV" else x.T
        s = jnp.dot(h, dv(w), preferred_element_type=jnp.float32)
        t = teacher if teacher_kind == "logits" else teacher[0] @ dv(teacher[1])
        lp_s = jax.nn.log_softmax(s / temperature, axis=-1)
        lp_t = jax.nn.log_softmax(jax.lax.stop_gradient(t).astype(jnp.float32) / temperature, -1)
        p_s, p_t = jnp.exp(lp_s), jnp.exp(lp_t)
        rev = (p_s * (lp_s - lp_t)).sum(-1)
        fwd = (p_t * (lp_t - lp_s)).sum(-1)
        return mix(rev, fwd, -(p_t * lp_t).sum(-1), s.shape[-1])

    def two_calls(h, w, teacher):
        t = teacher_arg(teacher)
        rev, fwd = (kernels.fused_linear_jsd(h, w, t, alpha=a, **kw) for a in (1.0, 0.0))
        if teacher_kind == "logits":
            lp_t = jax.nn.log_softmax(t.astype(jnp.float32) / temperature, axis=-1)
            entropy = -(jnp.exp(lp_t) * lp_t).sum(-1)
        else:  # a third sweep, over the teacher only
            y = jnp.zeros((h.shape[0],), jnp.int32)
            entropy = kernels.fused_linear_logprobs(
                *t, y, temperature=temperature, head_layout=layout, with_entropy=True
            ).entropy
        return mix(rev, fwd, entropy, w.shape[1 if layout == "DV" else 0])

    def fused_linear(h, w, teacher):
        kl = kernels.fused_linear_kl_pair(h, w, teacher_arg(teacher), **kw)
        return mix(kl.reverse_kl, kl.forward_kl, kl.teacher_entropy,
                   w.shape[1 if layout == "DV" else 0])  # fmt: skip

    return {"naive": naive, "two_calls": two_calls, "fused_linear": fused_linear}


def _memory_programs(args, vocab: int):
    """(losses by impl, abstract inputs, fields describing the setting) for ``args.op``."""
    dtype = jnp.dtype(args.dtype)
    struct = jax.ShapeDtypeStruct
    head_shape = lambda d: (d, vocab) if args.head_layout == "DV" else (vocab, d)
    h = struct((args.rows, args.width), dtype)
    w = struct(head_shape(args.width), dtype)
    if args.op == "logprobs":
        targets = struct((args.rows,), jnp.int32)
        return _logprobs_losses(args.temperature, args.head_layout), (h, w, targets), {}
    if args.teacher == "logits":
        teacher = struct((args.rows, vocab), dtype)
    else:
        teacher = (struct((args.rows, args.width), dtype), struct(head_shape(args.width), dtype))
    if args.op == "kl_pair":
        losses = _kl_pair_losses(args.temperature, args.teacher, args.head_layout)
        return losses, (h, w, teacher), {"teacher": args.teacher}
    losses = _memory_losses(args.alpha, args.temperature, args.teacher, args.head_layout)
    return losses, (h, w, teacher), {"teacher": args.teacher, "alpha": args.alpha}


def bench_memory(args) -> None:
    for vocab in args.vocab:
        losses, inputs, setting = _memory_programs(args, vocab)
        naive_bytes = None
        for impl, loss in losses.items():
            if args.impls is not None and impl not in args.impls:
                continue
            start = time.perf_counter()
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*inputs).compile()
            stats = compiled.memory_analysis()
            temp = int(stats.temp_size_in_bytes)
            naive_bytes = temp if impl == "naive" else naive_bytes
            layout = {} if args.op == "jsd" and args.head_layout == "DV" else {
                "head_layout": args.head_layout}  # fmt: skip
            _emit(
                bench="memory",
                op=args.op,
                impl=impl,
                N=args.rows,
                D=args.width,
                V=vocab,
                dtype=args.dtype,
                **layout,
                **setting,
                temp_bytes=temp,
                output_bytes=int(stats.output_size_in_bytes),
                argument_bytes=int(stats.argument_size_in_bytes),
                ratio_to_naive=None if naive_bytes is None else round(temp / naive_bytes, 5),
                backend=jax.default_backend(),
                compile_s=round(time.perf_counter() - start, 1),
            )


def _timed(f, *xs, repeats: int) -> float:
    """Median wall time of f(*xs) in seconds, after a warm-up call (compilation)."""
    jax.block_until_ready(f(*xs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*xs))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write) of ``nbytes``."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)  # one read and one write per element, no reuse
    return 2 * x.nbytes / _timed(copy, x, repeats=repeats)


def bench_time(args) -> None:
    backend = jax.default_backend()
    if backend == "cpu":
        raise SystemExit("--time needs a GPU or TPU: on CPU the Pallas kernels only interpret")
    impl = kernels.default_impl()
    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    vocab = args.vocab[0]

    # Correctness of the compiled kernel on the device, on a slice that float64 NumPy can afford.
    s = rng.normal(size=(64, vocab)).astype(np.float32) * 3
    t = rng.normal(size=(64, vocab)).astype(np.float32) * 3
    for alpha in (0.0, 0.5, 1.0):
        got = kernels.generalized_jsd(s, t, alpha=alpha, impl=impl)
        want = reference.generalized_jsd(s, t, alpha=alpha)
        err = float(np.max(np.abs(np.asarray(got) - want)))
        g = jax.grad(lambda x, a=alpha: kernels.generalized_jsd(x, t, alpha=a, impl=impl).sum())(s)
        gerr = float(
            np.max(np.abs(np.asarray(g) - reference.generalized_jsd_grad(s, t, alpha=alpha)))
        )
        _emit(bench="check", impl=impl, alpha=alpha, max_abs_err=err, grad_max_abs_err=gerr)
        assert err < 1e-3 and gerr < 1e-5, (err, gerr)

    key_s, key_t = jax.random.split(jax.random.key(0))
    dtype = jnp.dtype(args.dtype)
    s = (3 * jax.random.normal(key_s, (args.rows, vocab), jnp.float32)).astype(dtype)
    t = (3 * jax.random.normal(key_t, (args.rows, vocab), jnp.float32)).astype(dtype)
    # Forward reads both logits (twice in the interior α), backward reads both and writes ∂s.
    reads = 2 if args.alpha in (0.0, 1.0) else 4
    floor_bytes = (reads + 3) * args.rows * vocab * dtype.itemsize
    bandwidth = _copy_bandwidth(floor_bytes // 2, args.repeats)
    floor_s = floor_bytes / bandwidth
    results = {}
    for name in ("xla", impl):  # the baseline first: it prints even if the kernel runs long

        # The teacher is an argument, not a closed-over array: captured, it would be baked into
        # the program as a [N, V] constant (2.49 GB at the default shape: lowering alone then
        # outlasted the accelerator check's 120 s on an H200, 2026-12-04, and the step timed
        # 5.4 s against a 3.3 ms floor).
        def loss(x, teacher, name=name):
            return kernels.generalized_jsd(x, teacher, alpha=args.alpha, impl=name).sum()

        step = jax.jit(jax.value_and_grad(loss))
        results[name] = _timed(step, s, t, repeats=args.repeats)
        _emit(
            bench="time",
            impl=name,
            device=device,
            N=args.rows,
            V=vocab,
            dtype=args.dtype,
            alpha=args.alpha,
            fwd_bwd_s=results[name],
            floor_s=floor_s,
            fraction_of_floor=floor_s / results[name],
            copy_bandwidth_GBps=bandwidth / 1e9,
        )
    _emit(bench="speedup", impl=impl, over="xla", speedup=results["xla"] / results[impl])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--memory", action="store_true", help="compiled temp bytes (any backend)")
    mode.add_argument("--time", action="store_true", help="timed forward+backward (GPU/TPU)")
    mode.add_argument("--step", action="store_true", help="whole train steps' temp bytes")
    mode.add_argument("--topk", action="store_true", help="top-k vs full teacher memory")
    parser.add_argument("--k", type=int, default=64, help="--topk: the teacher's k")
    parser.add_argument("--rows", type=int, default=8192, help="N, tokens per step")
    parser.add_argument("--width", type=int, default=896, help="D, hidden width (Qwen2.5-0.5B)")
    parser.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=None,
        help="V values (memory default: 32768 65536 151936 262144; time default: 151936; "
        "step default: 32768 151936)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="1 = reverse KL (OPD)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default=None, help="memory default float32, time bfloat16")
    parser.add_argument(
        "--teacher",
        choices=["logits", "hidden"],
        default="logits",
        help="teacher given as logits [N, V] (an input) or as hidden states and head",
    )
    parser.add_argument(
        "--op",
        choices=["jsd", "logprobs", "kl_pair"],
        default="jsd",
        help="memory: jsd = the OPD divergence (naive, fused, fused_linear); logprobs = SFT "
        "cross-entropy / GRPO token logprobs (naive, fused_linear); kl_pair = entropy-aware OPD "
        "(naive, two_calls, fused_linear)",
    )
    parser.add_argument(
        "--head-layout",
        choices=list(kernels.HEAD_LAYOUTS),
        default="DV",
        help="memory: heads as [D, V] weights, or VD = a tied model's [V, D] embedding table",
    )
    parser.add_argument("--impls", nargs="+", default=None, help="default: all of the op's")
    parser.add_argument("--repeats", type=int, default=10)
    bench_step_memory.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.step:
        args.vocab = args.vocab or [32768, 151936]
        bench_step_memory.bench_step(args)
    elif args.topk:
        args.vocab = args.vocab or [151936]
        args.dtype = args.dtype or "float32"
        bench_topk_memory.bench_topk(args, _emit)
    elif args.memory:
        args.vocab = args.vocab or [32768, 65536, 151936, 262144]
        args.dtype = args.dtype or "float32"
        bench_memory(args)
    else:
        args.vocab = args.vocab or [151936]
        args.dtype = args.dtype or "bfloat16"
        bench_time(args)


if __name__ == "__main__":
    main()
