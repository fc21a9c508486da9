"""The one error type for input a user can fix.

A `UserError` names the problem and the fix in one sentence: a missing or truncated file, a flag
out of range, a tokenizer that does not match the model, a prompt longer than the context, a mesh
that does not fit the devices. Programs (experiments/*) print it as one line and exit with status
1; every other exception is a bug and keeps its traceback. It subclasses ValueError, so library
callers that catch ValueError keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix; programs report it in one line (status 1), no traceback."""


__all__ = ["UserError"]
