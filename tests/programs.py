"""Running the user's commands in tests: a main as one process, or through
scripts/launch_gpu_slurm.sh as N processes on loopback (a stand-in srun starts them)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(devices: int, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env.update({
        "NO_GCE_CHECK": "true",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(ROOT),
        # LLVM's -O0 halves a program's compile time on CPU; the numerics are XLA's either way.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                     "--xla_backend_optimization_level=0",
    })  # fmt: skip
    env.update(extra or {})
    return env


def run(module: str, *args: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m module args...` in the repository root with `devices` CPU devices."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_FAKE_SRUN = """#!/usr/bin/env bash
# A stand-in for SLURM's srun on one machine: `srun --ntasks=N ... bash -c TASK` runs TASK N
# times at once with SLURM_PROCID / SLURM_LOCALID set, each task's output in $SRUN_LOGS.
ntasks=1
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks=*) ntasks="${1#--ntasks=}";; esac
  shift
done
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 "$@" >"$SRUN_LOGS/rank$i.out" 2>"$SRUN_LOGS/rank$i.err" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def run_slurm(tmp_path, *command: str, tasks: int = 2, timeout: int = 600):
    """`bash scripts/launch_gpu_slurm.sh COMMAND...` inside a fake allocation of `tasks` nodes
    on this machine (a stand-in srun starts the tasks locally; the coordinator is 127.0.0.1).
    Returns (the launcher's completed process, [(stdout, stderr) per rank])."""
    bin_dir, logs = Path(tmp_path) / "bin", Path(tmp_path) / "srun_logs"
    bin_dir.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(_FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    python = bin_dir / "python"  # this interpreter (its venv) under the name the command uses
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = _env(1, {
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHON": sys.executable, "SRUN_LOGS": str(logs), "SLURM_JOB_ID": "1",
        "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(tasks),
        "SLURM_NNODES": str(tasks), "JAX_COORDINATOR_PORT": str(_free_port()),
    })  # fmt: skip
    launcher = subprocess.run(["bash", str(ROOT / "scripts" / "launch_gpu_slurm.sh"), *command],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    ranks = [((logs / f"rank{i}.out").read_text(), (logs / f"rank{i}.err").read_text())
             for i in range(tasks)]  # fmt: skip
    return launcher, ranks
