"""Activation memory of the jitted SFT step, compiled against the planner's estimate.

    python scripts/bench_memory.py [--layers 4,8,24 --remat none,full,dots --repeats 1]

For each (layers, remat) at Qwen2.5-0.5B's shape with a 32,768-token vocabulary, 8 x 1024 tokens
on one device, the step `train.make_step(train.sft_objective(config), optimizer)` is jitted by
`train.jit_step` and compiled from abstract inputs (`jax.ShapeDtypeStruct`s: nothing is
allocated), and one JSON line is printed:

    {"bench": "activation_memory", "model": "qwen2.5-0.5b", "layers": ..., "remat": ...,
     "tokens": 8192, "temp_bytes": ..., "planned_bytes": ..., "compile_s": ...}

`temp_bytes` is XLA's `compiled.memory_analysis().temp_size_in_bytes` (the step's temporaries;
its arguments, the state and batch, are `argument_bytes`), `planned_bytes` is
`jaxpost.plan.plan(...).temp_bytes` for the same step, and `compile_s` the lowering plus
compilation (the minimum over `--repeats`). A last line summarizes the acceptance checks of
issue 18: the per-layer increment of temp memory ((max layers - min layers) / difference) with
remat full against remat none, the planner's largest relative error, and compile time at the
most layers over the fewest. Results and machine: benchmarks/memory.md.
"""

import argparse
import json
import os
import time

os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpost import data, models, plan, train  # noqa: E402

MODEL, VOCAB, BATCH, SEQ_LEN = "qwen2.5-0.5b", 32_768, 8, 1024


def measure(layers: int, remat: str, repeats: int, scan_layers: bool = True) -> dict:
    """Compile the step for one setting; the JSON record."""
    config = models.get_config(MODEL, vocab_size=VOCAB, n_layers=layers, remat=remat,
                               scan_layers=scan_layers)  # fmt: skip
    optimizer = train.make_optimizer(train.OptimConfig())
    step = train.jit_step(train.make_step(train.sft_objective(config), optimizer))
    state = jax.eval_shape(lambda p: train.init_state(p, optimizer), models.abstract_params(config))
    batch = data.SequenceBatch(*[jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32)] * 3)
    times = []
    for _ in range(repeats):
        jax.clear_caches()  # or a repeat is served from the in-process compilation cache
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        times.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    planned = plan.plan(config, (1, 1, 1), batch=BATCH, seq_len=SEQ_LEN)
    return {
        "bench": "activation_memory",
        "model": MODEL,
        "layers": layers,
        "remat": remat,
        "tokens": BATCH * SEQ_LEN,
        "temp_bytes": memory.temp_size_in_bytes,
        "planned_bytes": planned.temp_bytes,
        "compile_s": round(min(times), 2),
        "argument_bytes": memory.argument_size_in_bytes,
        "vocab": VOCAB,
        "scan_layers": scan_layers,
        "backend": jax.default_backend(),
    }


def summary(records: list[dict]) -> dict:
    """The acceptance checks over the records (those that were measured)."""
    by = {(r["layers"], r["remat"]): r for r in records}
    layers = sorted({r["layers"] for r in records})
    lo, hi = layers[0], layers[-1]
    out: dict = {"bench": "activation_memory_summary", "layers": [lo, hi]}
    increments = {}
    for remat in sorted({r["remat"] for r in records}):
        if (lo, remat) in by and (hi, remat) in by and hi > lo:
            increments[remat] = (by[hi, remat]["temp_bytes"] - by[lo, remat]["temp_bytes"]) / (
                hi - lo
            )
    out["per_layer_increment_bytes"] = {k: round(v) for k, v in increments.items()}
    if "full" in increments and "none" in increments:
        out["full_over_none_increment"] = round(increments["full"] / increments["none"], 4)
    errors = [abs(r["planned_bytes"] / r["temp_bytes"] - 1) for r in records]
    out["max_planned_error"] = round(max(errors), 4)
    ratios = [
        by[hi, r]["compile_s"] / by[lo, r]["compile_s"]
        for r in {r["remat"] for r in records}
        if (lo, r) in by and (hi, r) in by
    ]
    if ratios:
        out["max_compile_ratio"] = round(max(ratios), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,8,24", help="comma-separated layer counts")
    ap.add_argument("--remat", default="none,full,dots", help="comma-separated remat policies")
    ap.add_argument("--repeats", type=int, default=1, help="compilations per setting (min time)")
    ap.add_argument("--unrolled", action="store_true", help="scan_layers=False (for comparison)")
    args = ap.parse_args()
    records = []
    for remat in args.remat.split(","):
        for layers in (int(n) for n in args.layers.split(",")):
            record = measure(layers, remat, args.repeats, scan_layers=not args.unrolled)
            records.append(record)
            print(json.dumps(record), flush=True)
    print(json.dumps(summary(records)), flush=True)


if __name__ == "__main__":
    main()
