"""One SFT train step at a model's shape (default Qwen2.5-0.5B), timed; one JSON line.

    python scripts/bench_train_step.py                       # qwen2.5-0.5b, 8 x 1024 tokens
    python scripts/bench_train_step.py --model tiny --batch 2 --seq-len 16 --repeats 2   # CPU

Random parameters of `models.get_config(--model)` (optionally fewer layers, another remat
policy), AdamW, and `train.make_step(train.sft_objective(config), ...)` jitted with the state
donated, on a random `data.SequenceBatch` whose first quarter of every row is prompt (no loss).
Compilation is timed on its own (`lower().compile()`); then one warm-up step and `--repeats`
timed steps, each waited for. The line holds the median step time, tokens/s (batch · seq_len
per step), XLA's temporary bytes of the compiled step and, where the device reports it, peak
device memory. `model_tflops_per_s` counts 6 FLOPs per matmul weight per token plus causal
attention (12 · layers · heads · head_dim · seq_len per token, the PaLM convention): an
estimate of useful work, not of what the device executes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpost import data, metrics_log, models, train  # noqa: E402


def flops_per_token(config: models.ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per token: 6 per matmul weight, plus causal attention."""
    matmul_weights = config.num_params()
    if not config.tie_embeddings:  # the input embedding is a lookup, not a matmul
        matmul_weights -= config.vocab_size * config.d_model
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return 6 * matmul_weights + attention


def random_batch(config: models.ModelConfig, batch: int, seq_len: int) -> data.SequenceBatch:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32)
    loss_mask = np.ones((batch, seq_len), np.int32)
    loss_mask[:, : seq_len // 4] = 0  # the prompt
    return data.SequenceBatch(
        tokens=jnp.asarray(tokens),
        attention_mask=jnp.ones((batch, seq_len), jnp.int32),
        loss_mask=jnp.asarray(loss_mask),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b", help="a jaxpost.models preset")
    ap.add_argument("--layers", type=int, default=None, help="override n_layers (default: preset)")
    ap.add_argument("--remat", choices=["none", "full", "dots"], default=None,
                    help="rematerialization per block (default: the preset's)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="also append the JSON line to this file")
    args = ap.parse_args(argv)

    overrides = {"n_layers": args.layers} if args.layers else {}
    if args.remat:
        overrides["remat"] = args.remat
    config = models.get_config(args.model, **overrides)
    if args.seq_len > config.max_seq_len:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's {config.max_seq_len}")
    optimizer = train.make_optimizer(train.OptimConfig(total_steps=1000))

    @jax.jit
    def init_state(key):
        return train.init_state(models.init(config, key), optimizer)

    state = jax.block_until_ready(init_state(jax.random.key(0)))
    batch = random_batch(config, args.batch, args.seq_len)
    step = train.jit_step(train.make_step(train.sft_objective(config), optimizer))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)

    step_s = statistics.median(times)
    tokens = args.batch * args.seq_len
    device = jax.devices()[0]
    memory = compiled.memory_analysis()
    stats = device.memory_stats() or {}  # None on CPU
    metrics_log.print_json_line({
        "bench": "train_step", "objective": "sft", "model": args.model,
        "layers": config.n_layers, "remat": config.remat, "dtype": config.dtype,
        "param_dtype": config.param_dtype, "batch": args.batch, "seq_len": args.seq_len,
        "tokens": tokens, "params": config.num_params(), "backend": jax.default_backend(),
        "device": device.device_kind, "compile_s": round(compile_s, 2),
        "step_s_median": round(step_s, 5), "step_s": [round(t, 5) for t in times],
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(flops_per_token(config, args.seq_len) * tokens / step_s
                                    / 1e12, 2),
        "temp_bytes": None if memory is None else int(memory.temp_size_in_bytes),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "loss": float(metrics["loss"]), "finite": int(metrics["finite"]),
    }, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
