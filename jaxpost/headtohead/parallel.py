"""The arms at once on a CPU: one worker process per core, each pinned to its core.

The arms are independent once the base and the teacher exist, and at the built-in student's
shapes one XLA:CPU process does not keep two cores busy: two processes pinned one per core take
1.35x the training steps per second of one process on both cores (`scripts/bench_train.py` run
once unpinned and as two pinned copies at once, AMD EPYC Zen 3 2-core CPU, 2026-12-04: an SFT
step 0.141 s alone, 0.208 s each for two at once); with their evaluations, which use two cores
better, four arms took 217 s instead of 244 s (benchmarks/paradigms_budget.md). So on a CPU
backend the protocol hands its pending arms to `arm.processes` workers (0: one per core this
process may use):

    parent                                  worker (python -m jaxpost.headtohead.parallel)
    writes the run's config; starts one     pins itself to its core, loads the cached models,
      worker per core, each with an arm       trains its arm (`arm_runs.train_and_evaluate`)
    evaluates the base and the teacher
      meanwhile, writes the base's          waits for the base's evaluation, evaluates its
      evaluation (with its samples)           arm against it, saves arms/<arm>/eval.json,
                                              says "done"
    sends the next arm to a worker that --> trains and evaluates it, says "done"; "": it ends
      is done
    reads every eval.json, the report

Every arm of such a run trains in a process of one core, whichever worker takes it and however
many run beside it, so its numbers do not depend on the schedule; they may differ from the same
arm trained in one process on all cores (`settings.arm_key` tells the two apart, so neither run
resumes the other's checkpoints). Workers speak JSON lines on their own pipe (their stdout and
stderr stay the parent's: a traceback shows). SIGTERM to the parent (or to the workers) stops
every running arm at its next step with its checkpoint saved; the parent then raises
`Preempted`, and rerunning the command resumes them. A parent killed outright (SIGKILL, out of
memory) takes its workers with it (Linux's parent-death signal), so no orphan goes on writing an
arm's directory beside the rerun that resumes it.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import glob
import json
import logging
import os
import pickle
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from jaxpost import hostmem
from jaxpost.errors import Preempted, UserError
from jaxpost.preemption import PreemptionGuard
from jaxpost.workdir import write_atomic

_STOP_WAIT_S = 300  # how long stopped workers get to save their checkpoints before a kill
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclasses.dataclass
class Outcomes:
    """What became of the pending arms: finished (their eval.json saved), diverged (and why),
    or neither because SIGTERM stopped the run (`preempted`; the running ones saved checkpoints)."""

    finished: list[str] = dataclasses.field(default_factory=list)
    diverged: dict[str, str] = dataclasses.field(default_factory=dict)
    preempted: bool = False


def cores() -> list[int]:
    """The CPU cores this process may run on (Linux; `settings.cpu_cores` counts them)."""
    return sorted(os.sched_getaffinity(0))


@dataclasses.dataclass
class _Worker:
    core: int
    proc: subprocess.Popen
    reader: object  # the read end of its message pipe (a file)
    buffer: bytes = b""
    arm: str | None = None  # the arm it is running


def run_arms(config, pending: list[str], processes: int, references: Callable[[], object],
             log: Callable[[str], None] = print) -> Outcomes:  # fmt: skip
    """Train and evaluate `pending` arms in `processes` pinned workers (at most one per arm);
    returns what did not finish. `references()` is the parent's own evaluation (the base's,
    which it returns, and the teacher's): it runs while the workers train their first arms,
    which wait for the base's evaluation before they evaluate. Raises UserError when an arm's
    settings are refused, and RuntimeError when a worker fails otherwise (its traceback is on
    stderr)."""
    queue = list(pending)
    n = min(processes, len(queue))
    root = os.path.join(config.workdir, "arms")
    os.makedirs(root, exist_ok=True)
    for stale in glob.glob(os.path.join(root, ".parallel-*")):  # a killed run's (the workdir
        os.remove(stale)  # is this run's: it holds the lock)
    job = os.path.join(root, f".parallel-{os.getpid()}")
    config = copy.deepcopy(config)
    with config.unlocked():
        config.arm.processes = processes  # resolved here: a worker sees one core, not all
        config.progress = False  # the parent shows one line per arm event instead
    with open(job + ".config.pkl", "wb") as f:
        pickle.dump(config, f)
    log(f"arms in {n} processes, one per CPU core ({', '.join(map(str, cores()[:n]))}): "
        f"{', '.join(queue)}")  # fmt: skip
    workers: list[_Worker] = []
    out, failure = Outcomes(), None
    sel = selectors.DefaultSelector()
    try:
        def pass_on() -> None:  # at once, even while the parent evaluates the base
            for w in workers:
                _signal(w, signal.SIGTERM)

        with PreemptionGuard(on_stop=pass_on) as guard:
            for core in cores()[:n]:
                w = _start(job, core, queue.pop(0))
                workers.append(w)
                sel.register(w.reader, selectors.EVENT_READ, w)
            write_atomic(job + ".base.pkl", pickle.dumps(references()))
            stopping = False
            while any(w.proc.poll() is None or w.reader in sel.get_map() for w in workers):
                if guard.should_stop and not stopping:  # the workers have it too
                    out.preempted = stopping = True
                    log("SIGTERM: stopping every running arm at its next step (checkpoints "
                        "are saved)")  # fmt: skip
                if not sel.get_map():
                    time.sleep(0.1)
                    continue
                for key, _ in sel.select(timeout=0.5):
                    w = key.data
                    chunk = os.read(w.reader.fileno(), 1 << 16)
                    if not chunk:  # the worker closed its pipe: it ended
                        sel.unregister(w.reader)
                        w.proc.wait()
                        if w.arm is not None and failure is None:
                            failure = RuntimeError(f"the worker running arm {w.arm} ended "
                                                   f"(exit status {w.proc.returncode}) without "
                                                   f"finishing it; rerun the command to resume "
                                                   f"it")  # fmt: skip
                        continue
                    w.buffer += chunk
                    while b"\n" in w.buffer:
                        line, w.buffer = w.buffer.split(b"\n", 1)
                        msg = json.loads(line)
                        if "log" in msg:
                            log(msg["log"])
                            continue
                        if "error" in msg:  # the worker ends after this message
                            cls = UserError if msg.get("user") else RuntimeError
                            failure = failure or cls(msg["error"])
                            w.arm = None
                            continue
                        if "done" in msg:
                            if msg["status"] == "ok":
                                out.finished.append(msg["done"])
                            elif msg["status"] == "diverged":
                                out.diverged[msg["done"]] = msg["why"]
                            # preempted, or SIGTERM reached it (not only the parent)
                            if msg["status"] == "preempted" or msg.get("stop"):
                                out.preempted = stopping = True
                            w.arm = None
                        if queue and not stopping and failure is None:
                            w.arm = queue.pop(0)
                            _send(w, w.arm)
                        else:
                            _send(w, "")  # nothing left for it: it exits
                if failure is not None and not stopping:
                    stopping = True
                    for w in workers:  # the others save their checkpoints and stop
                        _signal(w, signal.SIGTERM)
    finally:
        for w in workers:  # a parent that raised: let the running arms save, then end them
            if w.proc.poll() is None:
                _signal(w, signal.SIGTERM)
                _send(w, "")  # an idle one waits for its next arm: there is none
        deadline = time.monotonic() + _STOP_WAIT_S
        for w in workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            w.reader.close()
        sel.close()
        for path in glob.glob(job + ".*"):
            os.remove(path)
    if failure is not None:
        raise failure
    if bad := [w for w in workers if w.proc.returncode not in (0, Preempted.exit_status)]:
        raise RuntimeError(f"arm workers ended with exit status "
                           f"{', '.join(str(w.proc.returncode) for w in bad)}")  # fmt: skip
    return out


def _start(job: str, core: int, arm: str) -> _Worker:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxpost.headtohead.parallel", job, str(core), str(write_fd),
         str(os.getpid()), arm],
        stdin=subprocess.PIPE, pass_fds=(write_fd,),
        env=hostmem.environ(),  # glibc's malloc on huge pages (read at start-up only)
        start_new_session=True,  # Ctrl-C reaches the parent, which stops them cleanly
    )  # fmt: skip
    os.close(write_fd)
    return _Worker(core, proc, os.fdopen(read_fd, "rb", buffering=0), arm=arm)


def _send(w: _Worker, line: str) -> None:
    """An arm for the worker to run next; "" (or nothing, its input closed): none, it ends."""
    try:
        if w.proc.stdin.closed:
            return
        w.proc.stdin.write((line + "\n").encode())
        w.proc.stdin.flush()
        if not line:
            w.proc.stdin.close()
    except (BrokenPipeError, ValueError):  # it already ended; its pipe's EOF says so
        pass


def _signal(w: _Worker, sig: int) -> None:
    if w.proc.poll() is None:
        w.proc.send_signal(sig)


# ---------------------------------------------------------------------------------------------
# the worker


def _worker(job: str, core: int, fd: int, parent: int, first: str) -> int:
    # A parent that dies without stopping its workers (SIGKILL, out of memory) takes them with
    # it: an orphan still training an arm would write beside the rerun that resumes that arm.
    # SIGKILL, not SIGTERM: its checkpoints and eval.json are written atomically, so a kill
    # loses only the steps since the last checkpoint.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        return 1
    os.sched_setaffinity(0, {core})  # before JAX starts its CPU client and thread pool
    channel = os.fdopen(fd, "w", buffering=1)

    def send(**msg) -> None:
        channel.write(json.dumps(msg) + "\n")

    def log(line: str) -> None:
        send(log=line)

    class _ToParent(logging.Handler):  # library warnings reach the parent's log, in order
        def emit(self, record: logging.LogRecord) -> None:
            log(f"{record.levelname.lower()}: {record.getMessage()}")

    logging.basicConfig(level=logging.WARNING, handlers=[_ToParent()], force=True)
    logging.captureWarnings(True)  # and Python's warnings

    # SIGTERM while no arm trains (loading, evaluating, waiting): finish what is running, take
    # no more; during an arm's training its loop's own guard takes it and saves a checkpoint
    with PreemptionGuard() as guard:
        base_eval = None

        def base():  # the parent's evaluation of the base, once it has written it
            nonlocal base_eval
            while base_eval is None:
                if os.path.exists(job + ".base.pkl"):
                    with open(job + ".base.pkl", "rb") as f:
                        base_eval = pickle.load(f)
                elif guard.should_stop:
                    raise Preempted("stopped while waiting for the base's evaluation")
                else:
                    time.sleep(0.2)
            return base_eval

        try:
            from jaxpost.headtohead import arm_runs, models

            with open(job + ".config.pkl", "rb") as f:
                config = pickle.load(f)
            arm_runs.use_compilation_cache(config.workdir, log, tidy=False)  # the parent's
            w = models.world(config)
            m = models.base_and_teacher(w, log=lambda s: None)
            arm = first
            while arm:
                if guard.should_stop:  # SIGTERM reached this worker before this arm
                    send(done=arm, status="preempted")
                    return Preempted.exit_status
                try:
                    outcome = arm_runs.train_and_evaluate(w, m, arm, base, log)
                except Preempted:
                    send(done=arm, status="preempted")
                    return Preempted.exit_status
                status = "ok" if outcome.diverged is None else "diverged"
                send(done=arm, status=status, why=outcome.diverged, stop=guard.should_stop)
                if guard.should_stop:
                    return Preempted.exit_status
                arm = sys.stdin.readline().strip()  # the next arm; "" or end of input: none
            return 0
        except UserError as e:
            send(error=str(e), user=True)
            return e.exit_status
        except Exception as e:
            import traceback

            traceback.print_exc()
            send(error=f"an arm's worker failed: {type(e).__name__}: {e} (traceback above)")
            return 2


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                     sys.argv[5]))
