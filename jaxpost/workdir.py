"""A run's directory: created writable, and written by one run at a time.

    workdir.claim("/runs/sft")   # makes it, checks it is writable, takes its lock (process 0)

Two runs writing one workdir would write checkpoints side by side, interleave metrics.jsonl and
train every cached model twice, each exiting 0. `claim` takes an advisory lock on
`WORKDIR/.jaxpost.lock` (`fcntl.flock`, exclusive, non-blocking) and writes the holder (host,
pid, command, start time) into the file. The kernel drops the lock when the holding process ends
in any way (exit, exception, SIGKILL, a crash), so a dead run never blocks the next one; the
file's text is only there to name a live holder in the refusal. A second claim from another
process fails at once with a `UserError` naming that holder; a second claim from the process
that holds the lock is a no-op (library callers may run several stages in one workdir).

A program runs inside `held(path)`, which releases the lock when the outermost hold of the
process ends, so a library call (a notebook's `headtohead.run`) does not keep its workdir locked
after it returns.

Multi-host runs: only process 0 writes the shared files, so only it takes the lock (the other
processes would otherwise refuse each other on a shared file system).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import sys
import time

from jaxpost.errors import UserError

LOCK_FILE = ".jaxpost.lock"
_held: dict[str, int] = {}  # realpath of a workdir -> the fd holding its lock (for the process)


def write_atomic(path: str, blob: bytes) -> None:
    """Write `path` whole or not at all (a temporary file beside it, then a rename): a reader,
    or a run killed midway, never sees half of it."""
    with open(path + ".tmp", "wb") as f:
        f.write(blob)
    os.replace(path + ".tmp", path)


def prepare(path: str) -> str:
    """Create `path` (and parents) and check that this process can write there."""
    if not path:
        raise UserError("a workdir is needed: pass --workdir=DIR (checkpoints, metrics and the "
                        "trained model are written there)")  # fmt: skip
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"the workdir {path} is a file, not a directory; pass another --workdir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the workdir {path}: {e.strerror}; pass a --workdir you "
                        f"can write to") from None  # fmt: skip
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"the workdir {path} is not writable by this user; pass a --workdir you "
                        f"can write to")  # fmt: skip
    return path


def claim(path: str, *, writer: bool = True) -> str:
    """`prepare(path)` and hold its lock for the rest of this process (`writer=False`, the
    non-zero processes of a multi-host run: only prepare)."""
    prepare(path)
    if not writer:
        return path
    key = os.path.realpath(path)
    if key in _held:
        return path
    lock = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file {lock}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"the workdir {path} is in use by {holder}; wait for that run to end, "
                        f"or pass another --workdir") from None  # fmt: skip
    except OSError as e:  # a file system without locks (some network mounts)
        os.close(fd)
        raise UserError(f"cannot lock {lock} ({e.strerror}); use a workdir on a file system "
                        f"that supports flock") from None  # fmt: skip
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
    os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({command[:200]})\n").encode())  # fmt: skip
    _held[key] = fd
    return path


@contextlib.contextmanager
def held(path: str, *, writer: bool = True):
    """`claim(path)` for the duration of the block (nested holds of one path: the outermost
    one releases)."""
    key = os.path.realpath(path) if path else path
    outermost = key not in _held
    claim(path, writer=writer)
    try:
        yield path
    finally:
        if outermost and writer:
            release(path)


def holding(run):
    """Decorate a program's `run(config, ...)` to run inside `held(config.workdir)` (process 0
    locks; the others only prepare the directory)."""

    @functools.wraps(run)
    def wrapper(config, *args, **kwargs):
        from jaxpost import distributed

        with held(config.workdir, writer=distributed.is_writer()):
            return run(config, *args, **kwargs)

    return wrapper


def release(path: str) -> None:
    """Drop this process's lock on `path` (the process's end drops it anyway)."""
    fd = _held.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


__all__ = ["LOCK_FILE", "claim", "held", "holding", "prepare", "release"]
