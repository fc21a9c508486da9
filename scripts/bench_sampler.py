"""Sampler throughput: jaxpost's jitted KV-cached decode against transformers' `generate`.

    python scripts/bench_sampler.py [--layers 4 --width 256 --batch 16 --prompt 32 --new 128]
    python scripts/bench_sampler.py --size large --out sampler.jsonl     # a GPU-sized shape

Both run the same random Qwen2-style checkpoint (built with transformers, loaded into jaxpost with
`load_hf`), greedy, with a KV cache, on the same machine; the runs alternate so drift in machine
load hits both. transformers runs on CUDA when JAX's backend is a GPU and torch sees one
(`--torch-device`). One JSON line per measurement, then a summary line holding
`speedup_vs_transformers` (ratio of decode tokens/s) against transformers at its best thread
count (on CPU it runs at each of `--torch-threads`, default 1 and every core; the per-count
numbers are in `transformers_tokens_per_s_by_threads`), and `floor_ratio`: jaxpost's generation
time over a jitted while-loop of the same matmuls (the prefill's once, then each decode step's:
q/k/v/o, attention over the cache window of the sampler's decode segment with keys laid out as
its cache holds them, the MLP and the head, each layer its own weights, on random operands),
timed in the same process; 1.0 would be a sampler that costs nothing beyond its matmuls
(`floor_tokens_per_s` and `floor_speedup_vs_transformers` say what that sampler would reach).
With `--out` each line is also appended to that file. jaxpost's compilation is timed separately
and excluded from its tokens/s; both numbers include the prefill of the prompts. `--size` picks
a preset shape (small: the CPU default; large: 8 layers of width 1024, V = 32768, 64 prompts of
128 tokens, 256 new tokens, in bfloat16); explicit flags override it. `--skip-transformers`
times jaxpost alone.
"""

import argparse
import functools
import os
import statistics
import tempfile
import time

os.environ.setdefault("NO_GCE_CHECK", "true")

from jaxpost import hostmem  # noqa: E402

hostmem.reexec()  # the allocator the experiment mains run with: malloc on huge pages

import jax  # noqa: E402
import numpy as np  # noqa: E402

SIZES = {
    "small": dict(layers=4, width=256, vocab=4096, batch=16, prompt=32, new=128, dtype="float32"),
    "large": dict(layers=8, width=1024, vocab=32768, batch=64, prompt=128, new=256,
                  dtype="bfloat16"),
}  # fmt: skip


def matmul_floor(config, batch: int, prompt: int, new: int):
    """A jitted while-loop of the sampler's matmuls (module docstring) on random operands."""
    import jax.numpy as jnp

    from jaxpost import sampler

    c = config
    D, H, K, E, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
    dt = c.compute_dtype
    ends = sampler.segment_ends(new)  # the sampler's decode segments and their cache windows
    keys = iter(jax.random.split(jax.random.key(0), 4 * c.n_layers + 2 + 2 * len(ends)))

    def rand(*shape):
        return (jax.random.normal(next(keys), shape) * 0.02).astype(dt)

    # each layer its own weights, as the model's: one set reused by every layer would stay in
    # cache where the model's are streamed from memory (such a floor ran ~1.3x faster)
    w = dict(layers=[dict(qkv=rand(D, (H + 2 * K) * E), o=rand(H * E, D), up=rand(D, 2 * F),
                          down=rand(F, D)) for _ in range(c.n_layers)],
             head=rand(D, V))  # fmt: skip
    # the cache as the sampler lays it out: keys [B·K, E, S], values [B·K, S, E], S the window
    windows = [(rand(c.n_layers, batch * K, E, prompt + end),
                rand(c.n_layers, batch * K, prompt + end, E)) for end in ends]  # fmt: skip

    def layers(w, kv, x, rows):  # x [batch·rows, D]: every layer's dots, then the head
        for i, wl in enumerate(w["layers"]):
            qkv = x @ wl["qkv"]
            q = qkv[:, : H * E].reshape(batch * K, -1, E)
            att = jnp.einsum("bqe,bes->bqs", q, kv[0][i], preferred_element_type=jnp.float32)
            out = jnp.einsum("bqs,bse->bqe", att.astype(dt), kv[1][i])
            x = out.reshape(batch * rows, H * E) @ wl["o"]
            x = (x @ wl["up"])[:, :F] @ wl["down"]
        return x, x[-batch:] @ w["head"]

    x0 = rand(batch * prompt, D)

    # The weights are arguments, not closed-over constants that XLA could fold into the program.
    @jax.jit
    def run(w, windows, x0):
        x, _ = layers(w, windows[0], x0, prompt)
        carry = (jnp.int32(0), x[-batch:])
        for end, kv in zip(ends, windows):

            def body(carry, kv=kv):
                t, x = carry
                x, logits = layers(w, kv, x, 1)
                return t + 1, x + logits[:, :1].astype(dt)

            carry = jax.lax.while_loop(lambda cr, end=end: cr[0] < end, body, carry)
        return carry[1]

    return functools.partial(run, w, windows, x0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="preset shape")
    for name in ("layers", "width", "vocab", "batch", "prompt", "new"):
        ap.add_argument(f"--{name}", type=int, default=None, help="overrides --size")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda when JAX runs on a GPU and torch sees one")  # fmt: skip
    ap.add_argument("--skip-transformers", action="store_true", help="time jaxpost only")
    ap.add_argument("--torch-threads", default="", help="comma-separated thread counts for "
                    "transformers on CPU (default: 1 and os.cpu_count())")  # fmt: skip
    ap.add_argument("--out", default=None, help="also append every JSON line to this file")
    args = ap.parse_args()
    for name, value in SIZES[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    import torch
    import transformers

    from jaxpost import metrics_log, sampler
    from jaxpost.models import hf

    def emit(record: dict) -> None:
        metrics_log.print_json_line(record, args.out)

    device = args.torch_device
    if device == "auto":
        on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        device = "cuda" if on_gpu else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
        num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
        num_key_value_heads=max(1, args.width // 128),
        max_position_embeddings=max(1024, args.prompt + args.new),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory(prefix="bench_sampler_") as path:  # gone once loaded
        torch_model.save_pretrained(path, safe_serialization=True)
        config, params = hf.load_hf(path, dtype=args.dtype)
    torch_model = torch_model.to(device=device, dtype=torch_dtype)

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, args.vocab, (args.batch, args.prompt))
    new_tokens = args.batch * args.new
    common = dict(
        layers=args.layers, width=args.width, vocab=args.vocab, batch=args.batch,
        prompt_len=args.prompt, new_tokens=args.new, dtype=args.dtype,
        backend=jax.default_backend(), jax_device=jax.devices()[0].device_kind,
        torch_device=device,  # transformers' thread count is in each run's impl name
    )  # fmt: skip

    def run_jax() -> float:
        start = time.perf_counter()
        out = sampler.generate(
            config, params, prompts.tolist(), max_new_tokens=args.new, temperature=0,
            eos_id=None, seed=0,
        )  # fmt: skip
        jax.block_until_ready(out.tokens)
        assert int(out.lengths.min()) == args.new
        return time.perf_counter() - start

    def run_torch() -> float:
        ids = torch.tensor(prompts, device=device)
        start = time.perf_counter()
        with torch.no_grad():
            out = torch_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                min_new_tokens=args.new, do_sample=False, use_cache=True, pad_token_id=0,
            )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == args.prompt + args.new
        return time.perf_counter() - start

    floor = matmul_floor(config, args.batch, args.prompt, args.new)
    threads = [None]
    if device == "cpu":
        threads = sorted({int(t) for t in args.torch_threads.split(",") if t} or
                         {1, os.cpu_count() or 1})  # fmt: skip

    def run_torch_at(n):
        if n is not None:
            torch.set_num_threads(n)
        return run_torch()

    first = run_jax()
    jax.block_until_ready(floor())
    runs = {"jaxpost": [], "floor": []}
    if not args.skip_transformers:
        for n in threads:
            runs[f"transformers@{n}"] = []
            run_torch_at(n)  # warm-up of torch's kernels and caches
    for _ in range(args.repeats):
        runs["jaxpost"].append(run_jax())
        start = time.perf_counter()
        jax.block_until_ready(floor())
        runs["floor"].append(time.perf_counter() - start)
        if not args.skip_transformers:
            for n in threads:
                runs[f"transformers@{n}"].append(run_torch_at(n))
    compile_s = first - min(runs["jaxpost"])

    for name, times in runs.items():
        for i, t in enumerate(times):
            emit({"bench": "sampler", "impl": name, "repeat": i, "seconds": round(t, 6),
                  "decode_tokens_per_s": round(new_tokens / t, 1), **common})  # fmt: skip
    jax_s = statistics.median(runs["jaxpost"])
    jax_tps = new_tokens / jax_s
    floor_s = statistics.median(runs["floor"])
    summary = {"bench": "sampler_summary", "jaxpost_tokens_per_s": round(jax_tps, 1),
               "jaxpost_compile_s": round(compile_s, 2),
               "floor_tokens_per_s": round(new_tokens / floor_s, 1),
               "floor_ratio": round(jax_s / floor_s, 3)}  # fmt: skip
    by_threads = {name.split("@")[1]: round(new_tokens / statistics.median(t), 1)
                  for name, t in runs.items() if name.startswith("transformers")}  # fmt: skip
    if by_threads:
        torch_tps = max(by_threads.values())
        summary["transformers_tokens_per_s"] = torch_tps
        summary["transformers_tokens_per_s_by_threads"] = by_threads
        summary["speedup_vs_transformers"] = round(jax_tps / torch_tps, 2)
        # what a sampler costing nothing beyond its matmuls would reach
        summary["floor_speedup_vs_transformers"] = round(new_tokens / floor_s / torch_tps, 2)
    emit({**summary, **common})


if __name__ == "__main__":
    main()
