"""The TPU-pod and SLURM launchers: shell syntax, and what their dry runs would execute."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test runs a launcher script

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "scripts" / "launch_tpu_pod.sh"
SLURM = REPO / "scripts" / "launch_gpu_slurm.sh"


def _bash(*args, env=None, cwd=REPO):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=60)  # fmt: skip


def _allocation(**more):
    """A SLURM allocation's environment without scontrol (expand_nodelist is used)."""
    return {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "gpu-[07-09]", "SLURM_NTASKS": "3", "SLURM_NNODES": "3",
            "PATH": "/usr/bin:/bin", **more}  # fmt: skip


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_shell_syntax(script):
    proc = _bash("-n", script)
    assert proc.returncode == 0, proc.stderr


def test_tpu_dry_run_prints_per_worker_commands():
    proc = _bash(TPU, "--dry_run", "--tpu=my-pod", "--zone=us-central2-b", "--",
                 "python", "-m", "experiments.grpo")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ssh = [shlex.split(line) for line in proc.stdout.splitlines() if "tpu-vm ssh" in line]
    assert len(ssh) == 3  # unpack the tree, install, run
    for words in ssh:
        assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
        assert "--zone=us-central2-b" in words and "--worker=all" in words
    commands = [w.split("=", 1)[1] for words in ssh for w in words if w.startswith("--command=")]
    assert "pip install -q -e '.[tpu]'" in commands[1]
    assert commands[2] == "cd jaxpost && python -m experiments.grpo"
    assert "tpu-vm scp" in proc.stdout  # the local tree is copied to every worker


def test_tpu_dry_run_from_a_git_url_with_project():
    proc = _bash(TPU, "--dry_run", "--tpu=p", "--zone=z", "--project=proj",
                 "--repo_url=https://example.com/jaxpost.git", "--branch=dev", "--",
                 "python", "-m", "experiments.sft", "--config.steps=5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert all("--project=proj" in words and "--worker=all" in words for words in lines)
    assert "git clone -q --branch dev https://example.com/jaxpost.git" in lines[0][-1]
    assert lines[-1][-1].endswith("python -m experiments.sft --config.steps=5")


@pytest.mark.parametrize("args", [["--zone=z", "--", "python"], ["--tpu=p", "--zone=z"]])
def test_tpu_missing_arguments_are_errors(args):
    proc = _bash(TPU, "--dry_run", *args)
    assert proc.returncode == 2 and "launch_tpu_pod.sh:" in proc.stderr


def test_slurm_dry_run_prints_the_per_node_command():
    env = _allocation()
    proc = _bash(SLURM, "python", "-m", "experiments.grpo", "--mesh=-1,8,1", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    srun = shlex.split(lines[0])
    assert srun[:3] == ["srun", "--ntasks=3", "--ntasks-per-node=1"]
    assert "JAX_PROCESS_ID=$SLURM_PROCID" in srun[-1]
    nodes = [shlex.split(line.split(": ", 1)[1]) for line in lines[1:]]
    assert [line.split(":")[0] for line in lines[1:]] == ["node gpu-07", "node gpu-08",
                                                          "node gpu-09"]  # fmt: skip
    for rank, words in enumerate(nodes):
        assert words[:3] == ["JAX_COORDINATOR_ADDRESS=gpu-07:12345", "JAX_NUM_PROCESSES=3",
                             f"JAX_PROCESS_ID={rank}"]  # fmt: skip
        assert words[3:] == ["python", "-m", "experiments.grpo", "--mesh=-1,8,1"]


def test_slurm_under_sbatch_runs_in_the_directory_the_job_was_submitted_from(tmp_path):
    """sbatch runs a copy of the script from slurmd's spool directory, away from the tree."""
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    copy.write_text(SLURM.read_text())
    main = ("python", "-m", "experiments.opd")
    proc = _bash(copy, *main, env=_allocation(SLURM_SUBMIT_DIR=str(REPO)), cwd=spool)
    assert proc.returncode == 0, proc.stderr
    task = shlex.split(proc.stdout.splitlines()[0])[-1]
    assert f"cd {shlex.quote(str(REPO))} && exec python -m experiments.opd" in task
    proc = _bash(copy, *main, env=_allocation(SLURM_SUBMIT_DIR=str(spool)), cwd=spool)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"launch_gpu_slurm.sh: no jaxpost tree at {spool} (sbatch runs a copy of this script): "
        "submit the job from the repository's root"]


def test_slurm_nodelist_that_cannot_be_expanded_is_a_one_line_error():
    env = _allocation(SLURM_JOB_NODELIST="gpu-[07-")
    proc = _bash(SLURM, "python", "-m", "experiments.opd", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot expand SLURM_JOB_NODELIST='gpu-[07-' without scontrol" in line
    assert "unsupported SLURM nodelist item" in line


def test_slurm_environment_is_what_jaxpost_reads():
    """The variables the script exports select jaxpost's explicit initialization path."""
    from jaxpost import distributed

    env = {"JAX_COORDINATOR_ADDRESS": "gpu-07:12345", "JAX_NUM_PROCESSES": "3",
           "JAX_PROCESS_ID": "2", "SLURM_JOB_ID": "42", "SLURM_NTASKS": "3"}  # fmt: skip
    source, kwargs = distributed.distributed_init_args(env)
    assert source == "explicit"
    assert kwargs["coordinator_address"] == "gpu-07:12345" and kwargs["process_id"] == 2


def test_slurm_outside_an_allocation_is_an_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    proc = _bash(SLURM, "--dry_run", "python", "-m", "experiments.grpo", env=env)
    assert proc.returncode != 0 and "not inside a SLURM allocation" in proc.stderr
