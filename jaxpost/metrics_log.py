"""Metric logging: one JSON line per logged step, mirrored to TensorBoard, and deferred fetching.

The JSONL file is the record a report is built from (plain text, appendable, readable without
TensorFlow); TensorBoard is for watching a run live. Named `metrics_log` rather than `logging` so
that it never shadows the standard library's module.

Non-finite values. JSON has no NaN or infinity (Python's `json` would write the invalid tokens
`NaN`/`Infinity`, which strict parsers such as `jq` or JavaScript reject). A non-finite metric is
therefore written as `null`, and `read_metrics` turns `null` back into `float("nan")`: a diverged
loss stays visible as a gap in a plot instead of breaking the file. TensorBoard gets no point for
it either (a gap there too; tensorboardX would warn on stderr for every one).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"

_warned_no_tensorboard = False


def _to_python(name: str, value: Any) -> Any:
    """A scalar metric as a JSON-ready Python value: bool, int, float (non-finite -> None), str."""
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        array = np.asarray(value)
        if array.size != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
        value = array.reshape(()).item()
    if isinstance(value, bool):  # numpy bool_ arrays come back from .item() as bool
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {name!r} has unsupported type {type(value).__name__}")


class MetricsWriter:
    """Append scalar metrics to `<workdir>/metrics.jsonl` and, optionally, TensorBoard.

    Only process 0 of a multi-host run writes (metrics are global after the step's reductions, so
    the other processes would write the same numbers). Lines are flushed as they are written, so
    a run killed at any point leaves a valid file of the rows logged so far. A resumed run passes
    the step it restored: rows after it (logged before the crash, replayed now) are dropped from
    the file and purged from TensorBoard, so every step appears once.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
                 resume_step: int | None = None):  # fmt: skip
        """Open the writers; `tensorboard=False` (or tensorboardX missing) writes JSONL only;
        `resume_step`: keep only the rows up to that step."""
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self._active = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self._active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            _truncate_after(self.path, resume_step)
        # Line-buffered: every row reaches the OS as soon as it is written.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            purge = resume_step + 1 if resume_step else None
            self._tb = _summary_writer(self.workdir, purge)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log `metrics` (scalars: Python, numpy or jax; strings go to JSONL only) at `step`."""
        if not self._active:
            return
        if self._file is None:
            raise ValueError("MetricsWriter is closed")
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step argument; rename that metric")
        row = {"step": int(step), **{k: _to_python(k, v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                if isinstance(value, str):
                    continue
                value = row[name]
                if value is not None:
                    self._tb.add_scalar(name, value, int(step))

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (JSONL lines are never buffered)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both writers; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_after(path: str, step: int) -> None:
    """Keep the rows of `path` up to `step` (and lines that are not rows), atomically."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    kept = []
    for line in filter(str.strip, lines):
        try:
            row_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by the crash
        if not isinstance(row_step, int) or row_step <= step:
            kept.append(line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _summary_writer(logdir: str, purge_step: int | None = None):
    """tensorboardX's SummaryWriter, imported lazily (events from `purge_step` on, written before
    a resume, hidden); None (with one warning) if not installed."""
    global _warned_no_tensorboard
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        if not _warned_no_tensorboard:
            warnings.warn(
                "tensorboardX is not installed; metrics go to metrics.jsonl only "
                "(pip install tensorboardX for TensorBoard event files)",
                stacklevel=3,
            )
            _warned_no_tensorboard = True
        return None
    return SummaryWriter(logdir=logdir, purge_step=purge_step)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a file, or the workdir holding it), in the order written.

    `null` values (non-finite when written) come back as `float("nan")`. A last line cut short by
    a crash is skipped; a malformed line elsewhere raises, since that means the file is not ours.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1} is not a JSON line: {line[:80]!r}") from None
        rows.append({k: math.nan if v is None else v for k, v in row.items()})
    return rows


class DeferredMetrics:
    """Fetch step t's metrics only after step t+1 has been dispatched.

    Reading a device value blocks the host until the step that produces it finishes; doing that
    right after dispatching step t leaves the accelerator idle while the host prepares step t+1.
    Holding step t's metrics (still on device, their copy to host already started) until step
    t+1 is pushed keeps one step in flight at all times::

        deferred = DeferredMetrics()
        for step in range(1, steps + 1):
            state, metrics = train_step(state, batch(step))
            if (done := deferred.push(step, metrics)) is not None:
                writer.write(*done)
        if (done := deferred.flush()) is not None:
            writer.write(*done)
    """

    def __init__(self):
        self._pending: tuple[int, Any] | None = None

    def push(self, step: int, metrics: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
        """Hold `metrics` of `step`; return the previously held (step, metrics as floats), if any."""
        for leaf in jax.tree.leaves(metrics):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()
        previous = self.flush()
        self._pending = (int(step), metrics)
        return previous

    def flush(self) -> tuple[int, dict[str, float]] | None:
        """Return the held (step, metrics as floats) and hold nothing; None if nothing was held."""
        if self._pending is None:
            return None
        step, metrics = self._pending
        self._pending = None
        host = jax.device_get(metrics)
        return step, {name: float(np.asarray(value)) for name, value in host.items()}


def print_json_line(record: dict, out: str | os.PathLike | None = None) -> None:
    """Print one JSON line (a benchmark's result) and, given `out`, append it to that file."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


__all__ = ["METRICS_FILE", "DeferredMetrics", "MetricsWriter", "print_json_line", "read_metrics"]
