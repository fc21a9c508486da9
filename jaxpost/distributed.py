"""Multi-host initialization: JAX's own multi-controller runtime, from the launcher's environment.

One process per host runs the same program. Before any other JAX work each process calls

    from jaxpost.distributed import maybe_initialize_distributed
    maybe_initialize_distributed()   # a no-op for a single process

which reads how it was launched and calls `jax.distributed.initialize` accordingly:

    explicit  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (any launcher; what
              scripts/launch_gpu_slurm.sh exports, and what the loopback tests use)
    slurm     srun's SLURM_* variables, the coordinator being the first host of the step's
              nodelist
    tpu       a multi-host Cloud TPU slice: JAX detects the coordinator itself
              (scripts/launch_tpu_pod.sh runs the same command on every worker)

`distributed_init_args` is the pure decision (environment -> keyword arguments), so it is tested
without starting anything.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax

DEFAULT_COORDINATOR_PORT = 12345
_distributed_description: dict[str, Any] | None = None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as "node[01-04,07],gpu3" into host names.

    Supports comma-separated items with at most one bracket group each, holding numbers and
    zero-padded ranges (the forms SLURM prints for ordinary allocations).
    """
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    hosts = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if match is None:
            if "[" in item or "]" in item:
                raise ValueError(f"unsupported SLURM nodelist item {item!r} in {nodelist!r}")
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"unsupported SLURM nodelist range {part!r} in {nodelist!r}")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{width}d}{suffix}")
    if not hosts:
        raise ValueError(f"empty SLURM nodelist {nodelist!r}")
    return hosts


def distributed_init_args(env: Mapping[str, str]) -> tuple[str, dict[str, Any] | None]:
    """Decide how to start `jax.distributed` from environment variables (pure; no side effects).

    Returns (source, kwargs for `jax.distributed.initialize`, or None for a single process):
      "explicit"  JAX_COORDINATOR_ADDRESS (host or host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID;
      "slurm"     a SLURM job with SLURM_NTASKS > 1: the first host of SLURM_STEP_NODELIST (or
                  SLURM_NODELIST) on JAX_COORDINATOR_PORT, SLURM_NTASKS processes, SLURM_PROCID;
                  one process per node sees all its devices, several per node one device each;
      "tpu"       a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts, or a
                  multislice MEGASCALE_COORDINATOR_ADDRESS): JAX detects everything itself;
      "single"    anything else.
    Explicit and SLURM arguments switch JAX's own cluster detection off, so it cannot override
    them (its SLURM detection would pin each process to one device).
    """
    port = int(env.get("JAX_COORDINATOR_PORT", DEFAULT_COORDINATOR_PORT))
    explicit = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [k for k in explicit if env.get(k)]
    if present:
        missing = [k for k in explicit if not env.get(k)]
        if missing:
            raise ValueError(f"{present} set but {missing} missing: set all three or none")
        address = env["JAX_COORDINATOR_ADDRESS"]
        if not re.search(r":\d+$", address):
            address = f"{address}:{port}"
        return "explicit", {
            "coordinator_address": address,
            "num_processes": int(env["JAX_NUM_PROCESSES"]),
            "process_id": int(env["JAX_PROCESS_ID"]),
            "cluster_detection_method": "deactivate",
        }
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM job with several tasks but no SLURM_STEP_NODELIST/NODELIST")
        ntasks = int(env["SLURM_NTASKS"])
        kwargs: dict[str, Any] = {
            "coordinator_address": f"{expand_nodelist(nodelist)[0]}:{port}",
            "num_processes": ntasks,
            "process_id": int(env["SLURM_PROCID"]),
            "cluster_detection_method": "deactivate",
        }
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or ntasks)
        if ntasks > nodes:
            kwargs["local_device_ids"] = [int(env.get("SLURM_LOCALID", "0"))]
        return "slurm", kwargs
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(tpu_hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu", {}
    return "single", None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Start JAX's multi-controller runtime if the environment describes several processes.

    Call it before any other JAX work. Idempotent: later calls return the first description.
    Returns a small dict for logging: source, process_index, process_count and, when
    initialized from explicit or SLURM settings, the coordinator address.
    """
    global _distributed_description
    if _distributed_description is not None:
        return _distributed_description
    source, kwargs = distributed_init_args(os.environ if env is None else env)
    if kwargs is None:
        # Single process: nothing to start, and the backend is left untouched.
        description = {"source": source, "process_index": 0, "process_count": 1}
    else:
        if not jax.distributed.is_initialized():
            jax.distributed.initialize(**kwargs)
        description = {
            "source": source,
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
        }
        if "coordinator_address" in kwargs:
            description["coordinator"] = kwargs["coordinator_address"]
    _distributed_description = description
    return description


# ---------------------------------------------------------------------------------------------
# What each host reads and writes


def describe(mesh=None) -> str:
    """One line for a program's first output: processes, devices, this process's rank, mesh."""
    where = f"process {jax.process_index()} of {jax.process_count()}"
    devices = f"{jax.device_count()} {jax.default_backend()} devices ({jax.local_device_count()} local)"
    shape = "" if mesh is None else ", mesh " + ",".join(
        f"{name}={size}" for name, size in mesh.shape.items()
    )
    return f"jaxpost: {jax.process_count()} process(es), {devices}; this is {where}{shape}"


def is_writer() -> bool:
    """Whether this process writes shared files (metrics, models, reports): process 0 only;
    checkpoints are written by every process together (orbax)."""
    return jax.process_index() == 0


def local_rows(mesh, rows: int) -> slice:
    """The block of a global batch of `rows` examples this process loads: the rows its devices
    hold under the batch sharding (dim 0 over data x fsdp), which `global_batch_from_local`
    expects in this order. The whole batch for a single process or without a mesh."""
    if mesh is None or jax.process_count() == 1:
        return slice(0, rows)
    from jaxpost import sharding

    index_map = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((rows,))
    spans = sorted({(s[0].start or 0, rows if s[0].stop is None else s[0].stop)
                    for s in index_map.values()})  # fmt: skip
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's rows of the batch are not one block: {spans}")
    return slice(start, stop)


def host_rows(array):
    """The rows (dim 0) of a global array that this process's devices hold, as one numpy array
    in order (replicas on other mesh axes counted once). A plain array is returned whole."""
    import numpy as np

    if not isinstance(array, jax.Array) or array.is_fully_addressable:
        return np.asarray(array)
    pieces = {}
    for shard in array.addressable_shards:
        rows = shard.index[0]
        pieces.setdefault(rows.start or 0, np.asarray(shard.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)])


def all_hosts(values):
    """Concatenate a numpy array (or tree of them) along dim 0 over processes, in process order;
    the value itself for one process. Every process must call it (a collective)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(values, tiled=True)


def gather_rows(values, mine: slice):
    """The global rows of per-process numpy arrays (one, or a tuple of them) holding rows `mine`
    of a batch (`local_rows`): every process's block placed at its own rows, whatever the order
    of processes on the mesh. The values themselves for one process. A collective, like
    `all_hosts`."""
    if jax.process_count() == 1:
        return values
    import numpy as np

    spans, blocks = all_hosts((np.asarray([[mine.start, mine.stop]], np.int64), values))
    order = np.argsort(np.asarray(spans)[:, 0], kind="stable")

    def place(block):
        block = np.asarray(block)
        per = len(block) // len(order)
        return np.concatenate([block[i * per : (i + 1) * per] for i in order])

    return jax.tree.map(place, blocks)
