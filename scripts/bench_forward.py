"""Forward-pass throughput of `jaxpost.models.apply`, one JSON line per (preset, batch, length).

    python scripts/bench_forward.py [--presets tiny,100m --repeats 5 --dtype float32]

For each setting the forward is jitted once; `compile_s` is the lowering plus XLA compilation,
timed apart from the steady state. `tokens_per_s` is batch x length over the median of
`--repeats` timed calls (after one warm-up call), each ended by `block_until_ready`. Parameters
are random (`models.init`); the numbers measure compute, not a checkpoint. The default settings
are sized for a small CPU (the whole run takes about a minute on two cores).
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxpost import models  # noqa: E402

# (batch, length) settings per preset, sized so each timed call takes well under a second on CPU.
SETTINGS = {
    "tiny": [(8, 128)],
    "100m": [(1, 256), (4, 256)],
}


def bench(config: models.ModelConfig, preset: str, batch: int, length: int, repeats: int) -> dict:
    """Compile and time one forward configuration; returns the JSON record."""
    params = jax.jit(lambda key: models.init(config, key))(jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, config.vocab_size, (batch, length), dtype=np.int32))
    mask = jax.device_put(np.ones((batch, length), dtype=bool))

    forward = jax.jit(lambda p, t, m: models.apply(config, p, t, m))
    start = time.perf_counter()
    compiled = forward.lower(params, tokens, mask).compile()
    compile_s = time.perf_counter() - start

    jax.block_until_ready(compiled(params, tokens, mask))  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens, mask))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {
        "bench": "forward",
        "preset": preset,
        "params": config.num_params(),
        "batch": batch,
        "length": length,
        "dtype": config.dtype,
        "compile_s": round(compile_s, 3),
        "step_s": round(step_s, 5),
        "tokens_per_s": round(batch * length / step_s, 1),
        "repeats": repeats,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,100m", help="comma-separated, from SETTINGS")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per setting (median)")
    ap.add_argument("--dtype", default=None, help="override the presets' compute dtype")
    args = ap.parse_args()

    for preset in args.presets.split(","):
        if preset not in SETTINGS:
            raise SystemExit(f"no benchmark settings for preset {preset!r}; have {list(SETTINGS)}")
        overrides = {} if args.dtype is None else {"dtype": args.dtype}
        config = models.get_config(preset, **overrides)
        for batch, length in SETTINGS[preset]:
            print(json.dumps(bench(config, preset, batch, length, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
