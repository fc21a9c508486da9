"""MetricsWriter's JSONL and TensorBoard output, read_metrics, and DeferredMetrics ordering."""

import json
import math
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import metrics_log
from jaxpost.metrics_log import DeferredMetrics, MetricsWriter, read_metrics


def strict_json(line: str) -> dict:
    """json.loads that rejects NaN/Infinity tokens, as strict parsers (jq, JavaScript) do."""

    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def test_jsonl_rows_are_strict_json_with_python_scalars(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": jnp.float32(2.5), "tokens": np.int64(12), "lr": 1e-3})
        writer.write(np.int32(2), {"loss": jnp.asarray(jnp.nan), "grad_norm": np.float32(np.inf)})
        writer.write(3, {"loss": jnp.bfloat16(0.5), "skipped": jnp.asarray(True), "phase": "rl"})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [strict_json(line) for line in lines]
    assert rows == [
        {"step": 1, "loss": 2.5, "tokens": 12, "lr": 1e-3},
        {"step": 2, "loss": None, "grad_norm": None},
        {"step": 3, "loss": 0.5, "skipped": True, "phase": "rl"},
    ]
    assert type(rows[0]["tokens"]) is int

    back = read_metrics(tmp_path)
    assert math.isnan(back[1]["loss"]) and math.isnan(back[1]["grad_norm"])
    assert back[0] == rows[0] and back[2] == rows[2]


def test_resumed_writer_appends_and_truncated_last_line_is_skipped(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": 1.0})
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(2, {"loss": 0.5})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a crash in the middle of a write
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="not a JSON line"):
        read_metrics(path)


def test_bad_metrics_raise(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="scalar"):
            writer.write(1, {"loss": jnp.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(1, {"step": 4})
        with pytest.raises(TypeError, match="unsupported"):
            writer.write(1, {"config": {"lr": 1}})
    with pytest.raises(ValueError, match="closed"):
        writer.write(2, {"loss": 1.0})


def test_tensorboard_event_file_is_written(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 4):
            writer.write(step, {"loss": 1.0 / step, "reward": jnp.float32(step), "phase": "sft"})
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    # The scalar names are in the event records (protobuf strings are stored verbatim).
    payload = events[0].read_bytes()
    assert b"loss" in payload and b"reward" in payload and b"phase" not in payload

    with MetricsWriter(tmp_path / "jsonl_only", tensorboard=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert [p.name for p in (tmp_path / "jsonl_only").iterdir()] == ["metrics.jsonl"]


def test_missing_tensorboardx_warns_once_and_keeps_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the import raise ImportError
    monkeypatch.setattr(metrics_log, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="tensorboardX is not installed"):
        first = MetricsWriter(tmp_path / "a")
    with first:
        first.write(1, {"loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetricsWriter(tmp_path / "b").close()
    assert read_metrics(tmp_path / "a") == [{"step": 1, "loss": 1.0}]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsWriter(tmp_path / "worker") as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "worker").exists()


def test_deferred_metrics_returns_each_step_after_the_next_is_pushed():
    deferred = DeferredMetrics()
    released = []
    for step in range(1, 5):
        metrics = {"loss": jnp.float32(step) / 2, "count": jnp.int32(step)}
        out = deferred.push(step, metrics)
        if step == 1:
            assert out is None  # nothing is fetched before a second step is in flight
        else:
            released.append(out)
    released.append(deferred.flush())
    assert deferred.flush() is None
    assert released == [(s, {"loss": s / 2, "count": float(s)}) for s in range(1, 5)]
    assert all(type(v) is float for _, m in released for v in m.values())


def test_print_json_line_prints_and_appends(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    metrics_log.print_json_line({"bench": "a", "seconds": 0.5}, out)
    metrics_log.print_json_line({"bench": "b", "seconds": 1})
    metrics_log.print_json_line({"bench": "c", "seconds": 2}, str(out))
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["bench"] for r in printed] == ["a", "b", "c"]
    assert [json.loads(line)["bench"] for line in out.read_text().splitlines()] == ["a", "c"]
