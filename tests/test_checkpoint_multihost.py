"""Checkpoints written by several processes restore exactly, in any process layout.

Two local processes (tests/multihost_worker.py, joined by `jax.distributed.initialize` on
127.0.0.1) save one sharded TrainState with `jaxpost.checkpoint.Checkpointer` into a shared
directory, each writing only the shards its devices hold, and read it back onto the same mesh and
onto another multi-process mesh. This process then restores the same files onto its own 8-device
mesh and onto one device. Every restore must equal the state the processes started from.
"""

import jax
import multihost_worker
import numpy as np
import pytest

from jaxpost import sharding, train
from jaxpost.checkpoint import Checkpointer


def _vector(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _abstract(host_state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
        host_state,
        shardings,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "processes,save_mesh,restore_mesh", [(2, "1,2,2", "2,1,2"), (4, "1,4,2", "2,2,2")]
)
def test_processes_save_and_restore_a_sharded_train_state(tmp_path, processes, save_mesh,
                                                         restore_mesh):  # fmt: skip
    ckpt_dir = tmp_path / "checkpoints"
    # Save: fsdp across the processes, tensor inside each. Restore also onto a mesh with data
    # across processes, where each process must read shards others wrote.
    args = [
        "--scenario=checkpoint",
        f"--mesh={save_mesh}",
        f"--restore_mesh={restore_mesh}",
        f"--ckpt_dir={ckpt_dir}",
    ]
    results = multihost_worker.run_local_processes(processes, 2, args, tmp_path)

    host = multihost_worker.host_train_state()
    expected = _vector(host)
    for rank, (meta, arrays) in enumerate(results):
        assert meta["process_index"] == rank and meta["process_count"] == processes
        assert meta["embed_part_held"] == 1 / processes  # each saved only the shards it held
        assert meta["saved"] and meta["steps"] == [7]
        for name in ("same", "other"):
            assert meta[f"{name}_placed"], (rank, name)
            assert meta[f"{name}_extra"] == {"note": "two processes"}
            np.testing.assert_array_equal(arrays[name], expected, err_msg=f"{rank} {name}")

    # One process, a different mesh (8 local devices), then a single device.
    optimizer = train.make_optimizer(multihost_worker.OPTIM)
    config = multihost_worker.CONFIG
    with Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == 7
        for mesh in (
            sharding.make_mesh((2, 2, 2)),
            sharding.make_mesh((1, 1, 1), jax.devices()[:1]),
        ):
            target_sh = train.state_shardings(config, mesh, optimizer)
            restored, extra = ckpt.restore(_abstract(host, target_sh))
            assert extra == {"note": "two processes"}
            for leaf, want, s in zip(
                jax.tree.leaves(restored), jax.tree.leaves(host), jax.tree.leaves(target_sh)
            ):
                assert leaf.sharding == s
                np.testing.assert_array_equal(np.asarray(leaf), want, strict=True)
