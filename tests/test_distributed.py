"""Multi-host initialization and multi-process training on loopback.

The environment parsing is tested as a pure function; the multi-process tests start N local
processes (tests/multihost_worker.py) joined by `jax.distributed.initialize` on 127.0.0.1 with
CPU (gloo) collectives, and compare what they compute with one process on one device.
"""

import jax
import multihost_worker
import numpy as np
import pytest

from jaxpost import distributed, losses, sharding

# ---------------------------------------------------------------------------------------------
# Environment -> jax.distributed.initialize arguments


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node01", ["node01"]),
        ("a,b", ["a", "b"]),
        ("node[01-04]", ["node01", "node02", "node03", "node04"]),
        ("gpu[8-10,12]", ["gpu8", "gpu9", "gpu10", "gpu12"]),
        ("rack1-n[098-100]-ib,login", ["rack1-n098-ib", "rack1-n099-ib", "rack1-n100-ib", "login"]),
        ("a[1-2],b[3]", ["a1", "a2", "b3"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["n[1-2]-[3-4]", "n[a-c]", "", "n[1-2"])
def test_expand_nodelist_rejects_unsupported_forms(nodelist):
    with pytest.raises(ValueError, match=r"SLURM nodelist"):
        distributed.expand_nodelist(nodelist)


def test_init_args_explicit():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    source, kwargs = distributed.distributed_init_args(env)
    assert source == "explicit"
    assert kwargs == {
        "coordinator_address": "10.0.0.1:12345",
        "num_processes": 4,
        "process_id": 2,
        "cluster_detection_method": "deactivate",
    }
    env = {**env, "JAX_COORDINATOR_ADDRESS": "host:999", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}
    assert distributed.distributed_init_args(env)[1]["coordinator_address"] == "host:999"


def test_init_args_explicit_partial_is_an_error():
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID'\] missing"):
        distributed.distributed_init_args(
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}
        )


def test_init_args_slurm_one_process_per_node():
    env = {
        "SLURM_JOB_ID": "123",
        "SLURM_NTASKS": "4",
        "SLURM_NNODES": "4",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "0",
        "SLURM_NODELIST": "other[1-9]",
        "SLURM_STEP_NODELIST": "gpu-[007-010]",
        "JAX_COORDINATOR_PORT": "4000",
    }
    source, kwargs = distributed.distributed_init_args(env)
    assert source == "slurm"
    assert kwargs == {
        "coordinator_address": "gpu-007:4000",
        "num_processes": 4,
        "process_id": 3,
        "cluster_detection_method": "deactivate",
    }


def test_init_args_slurm_several_processes_per_node():
    env = {
        "SLURM_JOB_ID": "1",
        "SLURM_NTASKS": "16",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "a,b",
    }
    _, kwargs = distributed.distributed_init_args(env)
    assert kwargs["coordinator_address"] == "a:12345"
    assert kwargs["local_device_ids"] == [1]


@pytest.mark.parametrize(
    "env, source",
    [
        ({}, "single"),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_NODELIST": "a"}, "single"),
        ({"TPU_WORKER_HOSTNAMES": "t0"}, "single"),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ],
)
def test_init_args_tpu_and_single(env, source):
    got_source, kwargs = distributed.distributed_init_args(env)
    assert got_source == source
    assert kwargs == ({} if source == "tpu" else None)


def test_maybe_initialize_is_a_no_op_for_one_process_and_idempotent(monkeypatch):
    monkeypatch.setattr(distributed, "_distributed_description", None)
    description = distributed.maybe_initialize_distributed({})
    assert description == {"source": "single", "process_index": 0, "process_count": 1}
    assert not jax.distributed.is_initialized()
    # Idempotent: a second call (whatever the environment now says) changes nothing.
    slurm = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_NODELIST": "a"}
    assert distributed.maybe_initialize_distributed(slurm) is description


# ---------------------------------------------------------------------------------------------
# Local multi-process runs


@pytest.mark.slow
def test_two_local_processes_initialize_and_psum(tmp_path):
    results = multihost_worker.run_local_processes(
        2, 2, ["--scenario=psum", "--mesh=-1,1,1"], tmp_path
    )
    # Rows: two of ones (process 0) and two of twos (process 1), three columns each.
    for rank, (meta, _) in enumerate(results):
        assert meta["source"] == "explicit"
        assert meta["process_index"] == rank and meta["process_count"] == 2
        assert meta["devices"] == 4 and meta["shape"] == [4, 3]
        assert meta["psum"] == meta["sum"] == 2 * 3 * 1 + 2 * 3 * 2
        assert meta["flipped_rows"] == ([4, 8] if rank == 0 else [0, 4])  # process 1 holds 0..3
        assert meta["gathered"] == list(range(0, 80, 10))
        # each host's rows of advantages computed over the whole batch equal one process's
        want, _ = losses.group_advantages(multihost_worker.REWARDS, 2, scale="batch")
        np.testing.assert_allclose(meta["advantages"], np.asarray(want), rtol=1e-6)


@pytest.fixture(scope="module")
def one_process():
    """The single-process reference: the worker's own code on one device."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    return multihost_worker.run_train(mesh)


def _relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_processes, local_devices, mesh",
    [
        (2, 2, "1,2,2"),  # FSDP across the two processes, tensor parallelism inside each
        (4, 1, "2,2,1"),  # four processes of one device: data x fsdp over processes
    ],
)
def test_processes_train_exactly_as_one_process(
    num_processes, local_devices, mesh, one_process, tmp_path
):
    args = ["--scenario=train", f"--mesh={mesh}"]
    results = multihost_worker.run_local_processes(num_processes, local_devices, args, tmp_path)
    for rank, (meta, arrays) in enumerate(results):
        assert meta["process_index"] == rank and meta["process_count"] == num_processes
        assert meta["devices"] == 4 and meta["local_devices"] == local_devices
        for paradigm in ("sft", "opd"):
            np.testing.assert_allclose(meta[f"{paradigm}_loss"], one_process[f"{paradigm}_loss"],
                                       rtol=1e-5)  # fmt: skip
            # ||a - b|| / ||b|| over the parameter vector (see tests/test_train_mesh.py: Adam
            # turns reduction-order rounding into element-wise noise on ~0 gradients).
            assert _relative(arrays[paradigm], one_process[paradigm]) <= 1e-5, paradigm
            # Every process gathered the same global parameters.
            np.testing.assert_array_equal(arrays[paradigm], results[0][1][paradigm])
