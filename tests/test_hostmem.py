"""glibc's malloc on huge pages (jaxpost.hostmem): the tunable reaches the processes jaxpost
starts, an experiment main restarts itself with it exactly once, and a user's own setting or
JAXPOST_HUGE_PAGES=0 wins."""

import os
import subprocess
import sys

import pytest
from programs import ROOT

from jaxpost import hostmem
from jaxpost.headtohead import parallel


def test_environ_adds_the_tunable_once_and_keeps_the_users(monkeypatch):
    monkeypatch.setattr(hostmem, "supported", lambda: True)
    assert hostmem.environ({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": hostmem.TUNABLE}
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hostmem.environ(mine)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostmem.TUNABLE
    off = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the user's choice stays
    assert hostmem.environ(off) == off and hostmem.active(off)
    twice = hostmem.environ(hostmem.environ({}))
    assert twice["GLIBC_TUNABLES"] == hostmem.TUNABLE
    monkeypatch.setattr(hostmem, "supported", lambda: False)
    assert hostmem.environ({"A": "1"}) == {"A": "1"}


def test_opting_out_or_another_platform_is_not_supported(monkeypatch):
    monkeypatch.setenv("JAXPOST_HUGE_PAGES", "0")
    assert not hostmem.supported()
    monkeypatch.delenv("JAXPOST_HUGE_PAGES")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not hostmem.supported()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.31"))
    assert not hostmem.supported()
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("", ""))
    assert not hostmem.supported()


def _probe(env: dict) -> list[str]:
    """What a process started like `python -m experiments.<name>` sees once the package is
    imported: one line per time its code ran (an exec restarts it from the top)."""
    code = ("import os, sys; print('ran', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), "
            "flush=True); sys.argv[0] = '-m'; import experiments")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return out.stdout.split("\n")[:-1]


@pytest.mark.slow  # starts programs
def test_an_experiment_main_restarts_once_with_the_tunable(monkeypatch):
    monkeypatch.delenv("JAXPOST_HUGE_PAGES", raising=False)  # the suite's own opt-out (conftest)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)
    if not hostmem.supported():
        assert [x.split()[2:] for x in _probe(env)] == [[]]  # nothing to do: runs once as is
        pytest.skip("this machine's C library or kernel offers no huge pages to malloc")
    first, second = [x.split(" ") for x in _probe(env)]
    assert first[1] == second[1]  # the same process (a scheduler's pid stays valid)
    assert (first[2], second[2]) == ("", hostmem.TUNABLE)
    assert [x.split(" ")[2] for x in _probe({**env, "JAXPOST_HUGE_PAGES": "0"})] == [""]
    given = {**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert [x.split(" ")[2] for x in _probe(given)] == ["glibc.malloc.hugetlb=0"]


def test_the_arm_workers_start_with_the_tunable(monkeypatch, tmp_path):
    monkeypatch.setattr(hostmem, "supported", lambda: True)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    seen = {}

    class Popen:
        def __init__(self, args, **kw):
            seen.update(kw)

    monkeypatch.setattr(parallel.subprocess, "Popen", Popen)
    w = parallel._start(str(tmp_path / "job"), 0, "grpo")
    w.reader.close()
    assert seen["env"]["GLIBC_TUNABLES"] == hostmem.TUNABLE
