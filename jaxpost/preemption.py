"""Clean stops on preemption.

`PreemptionGuard` turns SIGTERM (what cluster schedulers send before killing a job) into a flag the
step loop polls; `sync_should_stop` makes every process of a multi-host run agree on it, so all of
them take the final save together (`jaxpost.runner`). The program then exits with status 143
(`jaxpost.errors.Preempted`); rerunning the same command resumes from the saved step.
"""

from __future__ import annotations

import logging
import signal
import threading
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

_log = logging.getLogger(__name__)


class PreemptionGuard:
    """Context manager that turns SIGTERM (optionally SIGINT) into a `should_stop` flag.

    Schedulers (Kubernetes, SLURM, TPU maintenance events) send SIGTERM some seconds before they
    kill a job. Instead of dying mid-step, the loop polls `guard.should_stop` after each step and,
    when set, saves with `force=True`, waits for the save, and returns. The previous handlers are
    restored on exit, so the guard composes with whatever the host program installed.

    With `sigint=True`, a first Ctrl-C requests the same clean stop and a second one is passed to
    the previous handler (normally: KeyboardInterrupt), so an impatient user can still abort.

    `on_stop()`, if given, runs in the handler as soon as the stop is requested (a parent passes
    the signal on to its worker processes there, even while it is busy elsewhere).

    Signal handlers can only be installed from the main thread; elsewhere (a loop run in a worker
    thread) the guard warns and stays inert, `should_stop` remaining False.
    """

    def __init__(self, *, sigint: bool = False, on_stop: Callable[[], None] | None = None):
        self.signals: tuple[int, ...] = (signal.SIGTERM,) + ((signal.SIGINT,) if sigint else ())
        self.on_stop = on_stop
        self.should_stop = False
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.should_stop and signum == signal.SIGINT:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            raise KeyboardInterrupt
        self.should_stop = True
        self.received = signum
        _log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        if self.on_stop is not None:
            self.on_stop()

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            _log.warning("PreemptionGuard outside the main thread: signals will not be caught")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # getsignal returns None for handlers not installed from Python; SIG_DFL is the
            # closest faithful restoration then.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def sync_should_stop(flag: bool) -> bool:
    """Whether any process wants to stop; every process gets the same answer.

    A signal reaches the processes of a multi-host job at different times (or only some of them).
    Since saving is collective, one process breaking out of the loop alone would deadlock the
    others in the next step's collectives; so the flags are all-gathered and OR-ed. This is a
    small blocking collective: call it once per step (or every few steps), at the same step on
    every process. Single process: returns `flag` unchanged.
    """
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray(flag, dtype=np.int32))
    return bool(np.any(flags))


__all__ = ["PreemptionGuard", "sync_should_stop"]
