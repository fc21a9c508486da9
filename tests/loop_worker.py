"""A short SFT run in its own process, for the kill-and-resume test.

    python tests/loop_worker.py WORKDIR STEPS OUT.npz [SLEEP_S]

Trains the tiny preset on fixed random token pairs with a checkpoint every 2 steps, sleeping
SLEEP_S after each step so the parent can SIGKILL it mid-run, then saves the final parameters.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxpost import loops, models, runner, train  # noqa: E402


def examples(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(3, 32, 4).tolist(), rng.integers(3, 32, int(rng.integers(3, 9))).tolist())
        for _ in range(n)
    ]


def main():
    workdir, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    config = models.get_config("tiny", vocab_size=32)
    loop = loops.LoopConfig(steps=steps, batch_size=8, seed=3, workdir=workdir,
                            checkpoint_every=2, progress=False)  # fmt: skip
    optim = train.OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=steps)
    if pause:
        real = runner.Runner._log

        def slow_log(self, step, metrics):
            real(self, step, metrics)
            print(f"step {step}", flush=True)
            time.sleep(pause)

        runner.Runner._log = slow_log
    result = loops.run_sft(config, models.init(config, seed=1), examples(), optim, loop)
    flat = {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(result.state.params)}  # fmt: skip
    np.savez(out, **flat)


if __name__ == "__main__":
    main()
