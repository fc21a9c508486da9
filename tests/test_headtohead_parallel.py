"""The head-to-head's arms at once, one pinned process per CPU core (jaxpost.headtohead.parallel),
through the user's command: they finish, the report reads their evaluations, SIGTERM stops them
with their checkpoints saved (status 143, one line), a parent killed outright takes its workers
with it, and the same command resumes them. (That an
arm's numbers are the same in a worker as in one process on both cores was seen on this
project's 2-core CPU, benchmarks/paradigms_budget.md 2026-12-04, not asserted: XLA:CPU may
split a matmul differently on other CPUs.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from programs import ROOT, _env
from test_headtohead import tiny

from jaxpost import UserError
from jaxpost.headtohead import arm_runs, settings
from jaxpost.metrics_log import read_metrics


def test_arm_processes_are_one_per_core_and_refused_beyond_the_cores(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert settings.arm_processes(tiny(tmp_path, **{"arm.processes": 0})) == 2
    assert settings.arm_processes(tiny(tmp_path, **{"arm.processes": 1})) == 1
    for value, match in ((3, "may use 2 CPU cores .* set it to at most 2, or 0"),
                         (-1, "arm.processes must be >= 0")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            settings.check(tiny(tmp_path, **{"arm.processes": value}))
    # how many run at once is not part of the keys; whether an arm had one core or all is
    keys = {n: (settings.model_key(c), settings.arm_key(c), settings.eval_key(c))
            for n in (0, 1, 2) for c in [tiny(tmp_path, **{"arm.processes": n})]}  # fmt: skip
    assert keys[0] == keys[2] and keys[1][0] == keys[2][0] and keys[1][1] != keys[2][1]


def test_a_compilation_cache_without_access_times_is_dropped(tmp_path):
    cache = tmp_path / "xla_cache"
    cache.mkdir()
    (cache / "jit_step-1-cache").write_bytes(b"program")
    (cache / "jit_step-1-atime").write_bytes(b"\0" * 8)
    lines = []
    assert not arm_runs.drop_cache_without_access_times(str(cache), lines.append)
    (cache / "jit_step-2-cache").write_bytes(b"program")  # an older jaxpost's entry
    assert arm_runs.drop_cache_without_access_times(str(cache), lines.append)
    assert not cache.exists() and "written without access times" in lines[0]


@pytest.mark.slow
def test_arms_in_worker_processes_stop_with_their_parent_and_resume(tmp_path):
    cmd = [sys.executable, "-m", "experiments.paradigms", "--mini", f"--workdir={tmp_path}",
           "--config.arms=sft,grpo", "--config.arm.processes=2", "--config.arm.steps=60"]  # fmt: skip
    env = _env(1, {"PYTHONUNBUFFERED": "1"})

    def start():
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def rows() -> dict[str, int]:  # steps each arm logged so far
        return {a: len(read_metrics(tmp_path / "arms" / a))
                if os.path.exists(tmp_path / "arms" / a / "metrics.jsonl") else 0
                for a in ("sft", "grpo")}  # fmt: skip

    first = start()
    while not any(rows().values()):  # an arm's loop runs (and handles SIGTERM) once it logged
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 143, err[-3000:]
    assert "arms in 2 processes, one per CPU core" in out
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in err.strip().splitlines() if not re.match(r"[WI]\d{4} ", x)]
    assert len(lines) == 1 and lines[0].startswith("experiments.paradigms: preempted (SIGTERM) "
                                                   "with arms "), err[-3000:]  # fmt: skip
    assert lines[0].endswith("rerun the same command to resume")
    assert not [p for p in os.listdir(tmp_path / "arms") if p.startswith(".parallel")]

    # the parent killed outright: its workers die with it (none keeps writing beside a rerun)
    stopped = rows()
    second = start()
    while all(n <= stopped[a] for a, n in rows().items()):  # until an arm trains again
        assert second.poll() is None, second.communicate()[1][-3000:]
        time.sleep(0.1)
    second.kill()
    second.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while _workers(tmp_path):
        assert time.monotonic() < deadline, "arm workers outlived their killed parent"
        time.sleep(0.2)

    third = start()
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-3000:]
    assert re.search(r"(sft|grpo): resuming from step \d+", out), out[-3000:]
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    stages = saved["settings"]["wall_seconds_by_stage"]
    assert set(stages) == {"models", "evaluation", "arms"}, stages
    for arm in ("sft", "grpo"):
        steps = [h["step"] for h in saved["arms"][arm]["history"]]
        assert steps == list(range(1, 61)), arm  # every step once, across the three runs
        assert saved["arms"][arm]["scalars"]["pass@1"]["mean"] >= 0  # the worker's eval.json


def _workers(workdir) -> list[int]:
    """Live arm workers of a run on `workdir` (their command line names its job file)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        if "jaxpost.headtohead.parallel" in cmd and str(workdir) in cmd:
            found.append(int(pid))
    return found
