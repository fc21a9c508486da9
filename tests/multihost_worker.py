"""One process of a multi-process test: run by tests/test_distributed.py, N at a time.

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=R \\
    XLA_FLAGS=--xla_force_host_platform_device_count=K \\
        python tests/multihost_worker.py --scenario=train --mesh=1,2,2 --out=DIR

Scenarios:
  psum        a 4-row global batch from per-process rows; psum and a jitted sum over it; rows
              gathered back into batch order (`distributed.gather_rows`) on a flipped mesh.
  train       one SFT step then one OPD step on the same global batch as a single process would
              see, each process loading only the rows its devices hold; writes DIR/rank{R}.npz
              with the gathered parameter vector after each step and the losses.
  checkpoint  a sharded TrainState saved by every process into --ckpt_dir with
              `jaxpost.checkpoint.Checkpointer`, then restored onto --mesh and onto --restore_mesh;
              writes the gathered state vectors.

The functions are importable, so the tests compute single-process references with the very same
code, and `run_local_processes` (the launcher) lives here for every multi-process test.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxpost import data, losses, models, sharding, train  # noqa: E402

CONFIG = models.get_config("tiny", vocab_size=64, n_layers=1)
TEACHER = models.get_config("tiny", vocab_size=64, d_model=32, mlp_dim=64, n_layers=1)
OPTIM = train.OptimConfig(learning_rate=3e-3, warmup_steps=0)
BATCH = 8
REWARDS = np.asarray([1, 0, 1, 1, 0, 0, 1, 0], np.float32)  # 4 groups of 2, unequal per half


def sft_batch() -> data.SequenceBatch:
    rng = np.random.default_rng(0)
    loss_mask = np.zeros((BATCH, 12), np.int32)
    loss_mask[:, 4:] = 1
    return data.SequenceBatch(tokens=rng.integers(3, 64, (BATCH, 12)).astype(np.int32),
                              attention_mask=np.ones((BATCH, 12), np.int32), loss_mask=loss_mask)  # fmt: skip


def rollout_batch(P: int = 6, M: int = 5) -> data.CompletionBatch:
    rng = np.random.default_rng(1)
    prompt_mask = np.ones((BATCH, P), np.int32)
    prompt_mask[::2, :2] = 0
    completion_mask = (np.arange(M)[None] < rng.integers(2, M + 1, BATCH)[:, None]).astype(np.int32)
    return data.CompletionBatch(
        prompt_tokens=rng.integers(3, 64, (BATCH, P)).astype(np.int32) * prompt_mask,
        prompt_mask=prompt_mask,
        completion=rng.integers(3, 64, (BATCH, M)).astype(np.int32) * completion_mask,
        completion_mask=completion_mask,
    )


def local_rows(mesh, batch_size: int) -> np.ndarray:
    """The rows of the global batch this process's devices hold, in order (what a per-host
    loader would read)."""
    index_map = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
    starts = sorted({(s[0].start or 0, s[0].stop or batch_size) for s in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in starts])


def load_global(batch, mesh):
    rows = local_rows(mesh, BATCH)
    return sharding.global_batch_from_local(jax.tree.map(lambda v: v[rows], batch), mesh)


def gathered_vector(tree) -> np.ndarray:
    """Every leaf (parameters; or a whole state, counters and rng data too) as one float64
    vector, gathered from every process."""
    from jax.experimental import multihost_utils

    full = multihost_utils.process_allgather(tree, tiled=True)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(full)])


def host_params(config, seed: int) -> dict:
    """Deterministic numpy parameters (normal(0.02) matrices, unit norm scales, zero biases):
    the same on every process and layout, and no program to compile."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim == 1 and "bias" not in name:
            return np.ones(x.shape, x.dtype)
        return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, models.abstract_params(config))


def put_global(tree, shardings):
    """Place identical host values on a (multi-process) sharding, each process filling only its
    own devices' shards."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        shardings,
    )


def run_train(mesh) -> dict:
    """One SFT step, then one OPD step, from the same initial parameters on every layout."""
    optimizer = train.make_optimizer(OPTIM)
    state_sh = train.state_shardings(CONFIG, mesh, optimizer)
    # AdamW's initial state is zeros (moments and counters), so the whole state is host data.
    host_state = train.init_state(host_params(CONFIG, 0), optimizer, seed=0)
    host_state = jax.tree.map(np.asarray, host_state)
    state = put_global(host_state, state_sh)
    teacher_sh = sharding.param_shardings(TEACHER, mesh)
    teacher = put_global(host_params(TEACHER, 9), teacher_sh)
    out = {}

    batch = load_global(sft_batch(), mesh)
    sft = train.jit_step(
        train.make_step(train.sft_objective(CONFIG), optimizer),
        state_sharding=state_sh, batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
    )  # fmt: skip
    with jax.set_mesh(mesh):
        state, metrics = sft(state, batch)
    out["sft_loss"] = float(metrics["loss"].addressable_data(0))
    out["sft"] = gathered_vector(state.params)

    batch = load_global(rollout_batch(), mesh)
    opd = train.jit_step(
        train.make_step(train.opd_objective(CONFIG, TEACHER, losses.opd_kl(0.5)), optimizer),
        state_sharding=state_sh, batch_sharding=jax.tree.map(lambda x: x.sharding, batch),
        frozen_sharding=(teacher_sh,),
    )  # fmt: skip
    with jax.set_mesh(mesh):
        state, metrics = opd(state, batch, teacher)
    out["opd_loss"] = float(metrics["loss"].addressable_data(0))
    out["opd"] = gathered_vector(state.params)
    return out


def host_train_state(seed: int = 0) -> train.TrainState:
    """The worker's TrainState as numpy values, every float leaf (Adam's moments included) filled
    with distinct non-zero numbers, so a restore that dropped or swapped a leaf would show."""
    state = train.init_state(host_params(CONFIG, seed), train.make_optimizer(OPTIM), seed=seed)
    rng = np.random.default_rng(seed + 1)

    def fill(x):
        x = np.asarray(x)
        if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
            return x
        return (0.5 + np.abs(rng.standard_normal(x.shape))).astype(x.dtype)

    state = jax.tree.map(fill, state)
    return state.replace(step=np.int32(7), skipped=np.int32(2))


def run_checkpoint(mesh, ckpt_dir: str, restore_mesh) -> dict:
    """Save the sharded state from every process; restore it onto `mesh` and `restore_mesh`."""
    from jaxpost.checkpoint import Checkpointer

    optimizer = train.make_optimizer(OPTIM)
    host = host_train_state()
    state = put_global(host, train.state_shardings(CONFIG, mesh, optimizer))
    # Which part of the embedding this process holds: under fsdp across processes, half of it,
    # so the checkpoint is complete only if every process wrote its own shards.
    embed = state.params["embed"]
    every = {str(i) for i in embed.sharding.devices_indices_map(embed.shape).values()}
    mine = {str(s.index) for s in embed.addressable_shards}
    out = {"embed_part_held": len(mine) / len(every)}
    with Checkpointer(ckpt_dir) as ckpt:
        out["saved"] = bool(ckpt.save(int(host.step), state, extra={"note": "two processes"}))
        ckpt.wait()
        out["steps"] = ckpt.all_steps()
        for name, target_mesh in (("same", mesh), ("other", restore_mesh)):
            target_sh = train.state_shardings(CONFIG, target_mesh, optimizer)
            abstract = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
                host,
                target_sh,
            )
            restored, extra = ckpt.restore(abstract)
            out[f"{name}_extra"] = extra
            out[f"{name}_placed"] = all(
                r.sharding == s
                for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target_sh))
            )
            out[name] = gathered_vector(restored)
    return out


def run_psum(mesh) -> dict:
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    rank = jax.process_index()
    local = {"x": np.full((len(local_rows(mesh, 4)), 3), rank + 1, np.float32)}
    x = sharding.global_batch_from_local(local, mesh)["x"]
    psum = jax.shard_map(
        lambda v: jax.lax.psum(jnp.sum(v), ("data", "fsdp")),
        mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P(),
    )(x)  # fmt: skip
    total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(x)
    # rows gathered back in the batch's order on a mesh whose devices run against the processes
    from jaxpost import distributed

    flipped = sharding.make_mesh((jax.device_count(), 1, 1), jax.devices()[::-1])
    mine = distributed.local_rows(flipped, 8)
    gathered = distributed.gather_rows(np.arange(8)[mine] * 10, mine)
    # GRPO's advantages of this process's rows, with one reward std over the whole batch
    from jaxpost import rollouts

    adv = rollouts.advantages(REWARDS[mine], mine, 2, "batch")
    return {"shape": list(x.shape), "psum": float(psum.addressable_data(0)),
            "sum": float(total.addressable_data(0)), "flipped_rows": [mine.start, mine.stop],
            "gathered": np.asarray(gathered).tolist(),
            "advantages": np.asarray(distributed.gather_rows(adv, mine)).tolist()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=("psum", "train", "checkpoint"), required=True)
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--restore_mesh", default=None, help="checkpoint: the second layout")
    parser.add_argument("--ckpt_dir", default=None, help="checkpoint: shared by all processes")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from jaxpost.distributed import maybe_initialize_distributed

    info = maybe_initialize_distributed()
    mesh = sharding.make_mesh(args.mesh)
    if args.scenario == "psum":
        result = run_psum(mesh)
    elif args.scenario == "train":
        result = run_train(mesh)
    else:
        restore_mesh = sharding.make_mesh(args.restore_mesh or args.mesh)
        result = run_checkpoint(mesh, args.ckpt_dir, restore_mesh)
    rank = jax.process_index()
    scalars = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    meta = {**info, "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            **scalars}  # fmt: skip
    np.savez(os.path.join(args.out, f"rank{rank}.npz"), meta=json.dumps(meta), **arrays)


# ---------------------------------------------------------------------------------------------
# The launcher (used by the tests, in the parent process)

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_processes(num_processes: int, local_devices: int, args, out_dir, timeout=240):
    """Run this file as `num_processes` processes with `local_devices` CPU devices each, joined
    on a free loopback port; return each rank's (meta, arrays)."""
    port = _free_port()
    procs = []
    for rank in range(num_processes):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "JAX_PLATFORMS": "cpu",
            # LLVM's -O0 halves the workers' compile time; numerics are XLA's either way.
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices} "
            "--xla_backend_optimization_level=0",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(num_processes),
            "JAX_PROCESS_ID": str(rank),
        }
        command = [sys.executable, os.path.abspath(__file__), *args, f"--out={out_dir}"]
        procs.append(subprocess.Popen(command, env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {rank} failed:\n{out[-3000:]}"
        with np.load(Path(out_dir) / f"rank{rank}.npz") as f:
            results.append((json.loads(str(f["meta"])), {k: f[k] for k in f.files if k != "meta"}))
    return results


if __name__ == "__main__":
    main()
