"""Host memory on Linux: glibc's malloc backed by transparent huge pages.

XLA:CPU takes every buffer of a program from the C library's malloc. glibc serves the large
ones (above its mmap threshold, 128 KiB rising to at most 32 MiB) with a fresh mmap each time,
and the kernel faults in each 4 KiB page of it on first touch: the head-to-head's processes
spent a fifth to a quarter of their CPU time in the kernel that way. glibc 2.35 and later can
ask for transparent huge pages for what it maps (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`,
honoured when the kernel's THP mode is `madvise` or `always`), which turns 512 of those faults
into one: on the project's 2-core AMD EPYC Zen 3 CPU (2026-12-05) the README's main command
took 715 s instead of 862 s, 3.4 M page faults instead of 141 M, with the same numbers
(benchmarks/paradigms_budget.md). The numbers computed do not change: only where the buffers
live. A run that mostly compiles is slower on them (the README's six-arm `--mini` command 100 s
against 86 s, same machine and day), which is why the test suite keeps the defaults.

glibc reads the tunable once, when a process starts, so it is set in the environment of the
processes jaxpost starts (`environ`), and an experiment main restarts itself with it once
(`reexec`, from `experiments/__init__.py`, before anything heavy is imported). Set
`JAXPOST_HUGE_PAGES=0` to keep the C library's defaults. Elsewhere (not Linux, not glibc, an
older glibc, THP `never`) nothing changes.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
    """glibc >= 2.35 on Linux with transparent huge pages not `never`, and not opted out."""
    if os.environ.get("JAXPOST_HUGE_PAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    lib, version = platform.libc_ver()
    try:
        if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
            return False
        with open(_THP) as f:
            return "[never]" not in f.read()
    except (OSError, ValueError):
        return False


def active(env=None) -> bool:
    """Whether `env` (default this process's environment) already carries the tunable."""
    env = os.environ if env is None else env
    return "glibc.malloc.hugetlb=" in env.get("GLIBC_TUNABLES", "")


def environ(env=None) -> dict[str, str]:
    """A copy of `env` (default os.environ) for a child process: with the tunable added to
    `GLIBC_TUNABLES` where `supported()` and not set already (a value the user set stays)."""
    env = dict(os.environ if env is None else env)
    if supported() and not active(env):
        env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), TUNABLE) if x)
    return env


def reexec() -> None:
    """Restart this process (same interpreter, arguments and pid) with the tunable, once; a
    no-op where it is set already or not supported, or if the restart itself fails."""
    env = environ()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):  # nothing to add
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        # the restarted process finds the tunable set: it goes on without restarting again
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except (OSError, ValueError):  # no interpreter path to restart (an embedded Python)
        pass
