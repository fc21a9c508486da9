"""The errors a program reports in one line, and the exit status each one gives a scheduler.

A `UserError` names the problem and the fix in one sentence: a missing or truncated file, a flag
out of range, a tokenizer that does not match the model, a prompt longer than the context, a mesh
that does not fit the devices, a workdir another run holds. Programs (experiments/*) print it as
one line and exit with its `exit_status`; every other exception is a bug and keeps its traceback.
It subclasses ValueError, so library callers that catch ValueError keep working.

Exit statuses of every main (what a scheduler or a retry loop reads):

    0    finished
    1    bad input or environment (`UserError`): fix what the line says; rerunning alone won't help
    3    training diverged (`Diverged`): the last good checkpoint is kept, no model is saved
    143  preempted (`Preempted`, after SIGTERM): a checkpoint is saved; rerun the same command
         to resume (143 = 128 + SIGTERM, what a shell reports for a job SIGTERM ended)
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix; programs report it in one line (status 1), no traceback."""

    exit_status = 1


class Diverged(UserError):
    """Training stopped because its steps kept being skipped (non-finite loss or gradient) or its
    loss exploded; the message says at which step and which checkpoint is the last good one."""

    exit_status = 3


class Preempted(Exception):
    """The run stopped on SIGTERM after saving a checkpoint; rerunning the command resumes it."""

    exit_status = 143


__all__ = ["Diverged", "Preempted", "UserError"]
