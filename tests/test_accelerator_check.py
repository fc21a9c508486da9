"""scripts/accelerator_check.sh: its CPU smoke mode runs every part and records each one.

The smoke mode (ACCELERATOR_CHECK_TINY=1) runs each part at tiny shapes, so the wiring the first
minutes on a GPU or TPU depend on (flags, output files, the accelerator test tier) is checked
here, where there is no accelerator.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "accelerator_check.sh")
PARTS = ["install", "device", "kernel_tests", "bench_kernels", "sampler", "train_step", "memory"]


def _run(outdir, **env):
    env = {**os.environ, "ACCELERATOR_CHECK_TINY": "1", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", SCRIPT, str(outdir)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path):
    proc = _run(tmp_path, PYTHON="false")  # every Python part fails at once
    assert proc.returncode == 1
    summary = _lines(tmp_path / "summary.jsonl")
    assert [r["part"] for r in summary] == PARTS
    assert all(r["status"] == "failed" and r["rc"] != 0 for r in summary)


@pytest.mark.slow
def test_no_part_starts_without_time_left(tmp_path):
    proc = _run(tmp_path, ACCELERATOR_CHECK_BUDGET_S="0")
    assert proc.returncode == 1
    assert {r["status"] for r in _lines(tmp_path / "summary.jsonl")} == {"no_time"}


@pytest.mark.slow
def test_smoke_mode_runs_every_part(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = _lines(tmp_path / "summary.jsonl")
    assert [(r["part"], r["status"]) for r in summary] == [(p, "ok") for p in PARTS]
    (device,) = _lines(tmp_path / "device.jsonl")
    assert device["backend"] == "cpu" and device["device_count"] >= 1
    # On CPU the compiled kernel tests are collected and skipped, with the reason.
    *tests, counts = _lines(tmp_path / "kernel_tests.jsonl")
    assert tests and counts == {"bench": "kernel_tests", "skipped": len(tests)}
    assert all("TestCompiled" in t["test"] for t in tests)
    assert {r["impl"] for r in _lines(tmp_path / "bench_kernels.jsonl")} == {
        "fused", "fused_linear"}  # fmt: skip
    sampler = _lines(tmp_path / "sampler.jsonl")
    assert sampler[-1]["bench"] == "sampler_summary" and sampler[-1]["jaxpost_tokens_per_s"] > 0
    (step,) = _lines(tmp_path / "train_step.jsonl")
    assert step["bench"] == "train_step" and step["tokens"] == 2 * 16
    assert step["finite"] == 1 and step["tokens_per_s"] > 0 and step["compile_s"] > 0
    memory = [r for r in _lines(tmp_path / "memory.jsonl") if r["bench"] == "activation_memory"]
    assert memory and all(r["temp_bytes"] > 0 and r["planned_bytes"] > 0 for r in memory)
