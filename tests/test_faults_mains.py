"""Every fault of a run, through the user's command: a second run on the workdir, divergence, a
corrupt checkpoint, preemption, a full disk, and each kind of bad input, against `experiments.sft`
(the head-to-head shares the workdir lock and the one-line errors) at the `tiny` config, shrunk.

Each ends in a documented exit status (jaxpost.errors: 1 bad input, 3 diverged, 143 preempted)
with at most a few lines on stderr and no traceback, and loses nothing that was saved.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from programs import ROOT, _env, run
from test_faults import _saved_model, poisoned

from jaxpost.metrics_log import read_metrics
from jaxpost.models import hf

pytestmark = pytest.mark.slow

# seconds-scale: one layer, 24 problems, no evaluation (each test is about the run, not the model)
SFT = ["--config=experiments/configs/sft.py:tiny", "--config.model_overrides=n_layers=1",
       "--config.data.train_problems=24", "--config.eval.prompts=0"]  # fmt: skip


def _sft(workdir, *extra, **kw):
    return run("experiments.sft", *SFT, f"--workdir={workdir}", *extra, **kw)


def _one_line(p, status: int) -> str:
    """The run ended with `status` and said why in one line (absl's warnings aside)."""
    assert p.returncode == status, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [x for x in p.stderr.strip().splitlines() if not re.match(r"[WI]\d{4} ", x)]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def _params(path):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(hf.load_hf(path)[1])])


def test_a_second_run_on_a_workdir_is_refused(tmp_path):
    held = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jaxpost import "
                               "workdir; workdir.claim(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(600)", str(held)], cwd=ROOT, env=_env(1),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for main, config in (("sft", SFT[0]), ("paradigms", "--config=experiments/configs/"
                                                            "paradigms.py:tiny")):  # fmt: skip
            p = run(f"experiments.{main}", config, f"--workdir={held}")
            line = _one_line(p, 1)
            assert line.startswith(f"experiments.{main}: error: the workdir {held} is in use by "
                                   f"pid {holder.pid} on {os.uname().nodename} since ")  # fmt: skip
            assert line.endswith("wait for that run to end, or pass another --workdir")
    finally:
        holder.kill()  # the kernel drops a dead holder's lock: no stale lock to clean up
        holder.wait()
    p = _sft(held)
    assert p.returncode == 0, p.stderr[-3000:]


def test_divergence_fails_and_saves_no_model(tmp_path):
    p = _sft(tmp_path, "--config.optim.learning_rate=1e10", "--config.loop.checkpoint_every=4")
    line = _one_line(p, 3)
    assert line.startswith("experiments.sft: error: sft diverged at step ")
    assert "10 consecutive steps were skipped for a non-finite loss or gradient" in line
    assert line.endswith("and no model was saved; lower the learning rate or raise the warmup")
    assert not os.path.exists(tmp_path / "model")


def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
    every = ["--config.loop.checkpoint_every=4", "--config.loop.log_every=1"]
    first = _sft(tmp_path, *every)
    assert first.returncode == 0, first.stderr[-3000:]
    os.replace(tmp_path / "model", tmp_path / "first_model")
    latest = tmp_path / "checkpoints" / "12"
    files = [os.path.join(d, f) for d, _, fs in os.walk(latest) for f in fs]
    with open(max(files, key=os.path.getsize), "r+b") as f:
        f.truncate(1000)  # a copy cut short
    again = _sft(tmp_path, *every)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"checkpoint step 12 in {tmp_path / 'checkpoints'} could not be restored ("
            in again.stdout)  # fmt: skip
    assert f"moved it to {tmp_path / 'checkpoints.corrupt' / '12'}; resuming from step 8" in again.stdout
    assert os.path.isdir(tmp_path / "checkpoints.corrupt" / "12")
    np.testing.assert_array_equal(_params(tmp_path / "model"), _params(tmp_path / "first_model"))
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 13))  # each step once


def test_sigterm_saves_exits_143_and_the_rerun_resumes(tmp_path):
    cmd = [sys.executable, "-m", "experiments.sft", *SFT, f"--workdir={tmp_path}",
           "--config.loop.steps=400", "--config.loop.log_every=1"]  # fmt: skip

    def start():
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(1), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    first = start()
    while not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path):
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.1)  # the loop runs (and handles SIGTERM) once a step is logged
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    line = _one_line(subprocess.CompletedProcess(cmd, first.returncode, out, err), 143)
    assert line.startswith("experiments.sft: sft: preempted (SIGTERM) after step ")
    stopped = int(line.split("after step ")[1].split(";")[0])
    assert line.endswith("the checkpoint is saved; rerun the same command to resume")
    second = start()
    assert f"sft: resuming from step {stopped} ({tmp_path / 'checkpoints'})" in [
        second.stdout.readline().strip() for _ in range(4)]  # fmt: skip
    while len(read_metrics(tmp_path)) <= stopped:  # it trains again (and handles SIGTERM)
        assert second.poll() is None, second.communicate()[1][-3000:]
        time.sleep(0.1)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 143, err[-3000:]
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= stopped  # each step once


@pytest.fixture
def small_disk(tmp_path):
    """A 3.5 MiB tmpfs: room for two checkpoints of the tiny model (1 MiB each on disk; a save
    asks for 1.1 x its bytes + 1 MiB free), not three."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; run the suite as root to test a full disk")
    mount = tmp_path / "disk"
    mount.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3584k", "tmpfs", str(mount)],
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(small_disk):
    run_dir = small_disk / "run"
    p = _sft(run_dir, "--config.loop.checkpoint_every=4", "--config.model_overrides=n_layers=2")
    line = _one_line(p, 1)
    assert line.startswith(f"experiments.sft: error: no space for checkpoint step 12 in "
                           f"{run_dir / 'checkpoints'}: it needs about ")  # fmt: skip
    assert "MiB are free; the last complete checkpoint is step 8" in line
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["4", "8"]
    assert not os.path.exists(run_dir / "model")


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return _saved_model(tmp_path_factory.mktemp("faults") / "good")


def _copy(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def _bad_input(case, tmp_path, good):
    """(the command's extra flags, what its one line must name) for each bad input."""
    w = f"--workdir={tmp_path / 'w'}"
    if case == "truncated config.json":
        m = _copy(good, tmp_path / "m")
        (m / "config.json").write_text((m / "config.json").read_text()[:50])
        return [w, f"--model={m}"], f"{m / 'config.json'} is not valid JSON"
    if case == "truncated safetensors":
        m = _copy(good, tmp_path / "m")
        (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:500])
        return [w, f"--model={m}"], f"cannot read {m / 'model.safetensors'}"
    if case == "NaN weights":
        m = poisoned(good, tmp_path / "m")
        return [w, f"--model={m}"], (
            f"tensor model.norm.weight in {tmp_path / 'm' / 'model.safetensors'} holds 1 NaN")
    if case == "unknown config key":
        return [w, "--config.loop.stepz=3"], "stepz"
    if case == "workdir is a file":
        (tmp_path / "f").write_text("")
        return [f"--workdir={tmp_path / 'f'}"], f"the workdir {tmp_path / 'f'} is a file"
    if case == "no workdir":
        return [], "a workdir is needed: pass --workdir=DIR"
    if case == "GSM8K record without an answer":
        d = tmp_path / "gsm8k"
        d.mkdir()
        (d / "train.jsonl").write_text(json.dumps({"question": "1+1?"}) + "\n")
        (d / "test.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "#### 4"}) + "\n")
        return [w, "--task=gsm8k", f"--config.task.data_dir={d}"], (
            f"{d / 'train.jsonl'}, record 1: record has no 'answer' field")
    raise AssertionError(case)


CASES = ["truncated config.json", "truncated safetensors", "NaN weights", "unknown config key",
         "workdir is a file", "no workdir", "GSM8K record without an answer"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_each_bad_input_is_one_line_naming_it(case, tmp_path, good_model):
    extra, named = _bad_input(case, tmp_path, good_model)
    p = run("experiments.sft", *SFT[:1], *extra)
    line = _one_line(p, 1)
    assert line.startswith("experiments.sft: error: ") and named in line, line
