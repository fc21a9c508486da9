"""The README's launcher command, run as printed: each main started by
scripts/launch_gpu_slurm.sh in a two-node allocation faked on this machine (a stand-in srun starts
the two tasks locally, each with the JAX_* variables the script exports and one CPU device),
against one process driving two devices.

Both runs use the main's `tiny` config variant and `--mesh=2,1,1`; the two-process run must say
it runs on 2 processes, finish, save its model, and end with the same parameters as the
one-process run (relative difference of the parameter vector <= 1e-5): each host loads only its
rows, samples only its prompts, and the arithmetic is one SPMD program either way.
"""

import os

import jax
import numpy as np
import pytest
from programs import run, run_slurm

from jaxpost.models import hf

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost_mains")]

# GRPO with one reward std over the whole batch, across hosts (rollouts.advantages; its exact
# check with unequal rewards per host is tests/test_distributed.py's psum scenario). The sft main
# across hosts is covered inside both: each first SFT-trains its built-in start (opd also its
# teacher) in the same two processes, and the final parameters compare after that stage too.
VARIANTS = {"grpo": ["--config.grpo.advantage_scale=batch"], "opd": []}


def _vector(model_dir: str) -> np.ndarray:
    _, params = hf.load_hf(model_dir)
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])


@pytest.mark.parametrize("main", sorted(VARIANTS))
def test_two_processes_train_as_one_process_on_two_devices(main, tmp_path):
    args = [f"--config=experiments/configs/{main}.py:tiny", "--mesh=2,1,1", *VARIANTS[main]]
    one = run(f"experiments.{main}", *args, f"--workdir={tmp_path / 'one'}", devices=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "1 process(es), 2 cpu devices" in one.stdout
    launcher, ranks = run_slurm(tmp_path, "python", "-m", f"experiments.{main}", *args,
                                f"--workdir={tmp_path / 'two'}")  # fmt: skip
    assert launcher.returncode == 0, [err[-3000:] for _, err in ranks]
    assert "2 process(es), 2 cpu devices (1 local); this is process 0 of 2" in ranks[0][0]
    # process 1 computes, process 0 reports (gloo announces its connections on both)
    assert [line for line in ranks[1][0].splitlines() if not line.startswith("[Gloo]")] == []
    model = tmp_path / "two" / "model"
    assert os.path.isfile(model / "config.json") and os.path.isfile(tmp_path / "two" / "eval.json")
    a, b = _vector(str(model)), _vector(str(tmp_path / "one" / "model"))
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
