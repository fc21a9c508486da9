"""Faults end in a clear outcome: the library's decisions, unit by unit (fast), and the user's
commands run as printed against each fault (slow: tests/test_faults_mains.py)."""

import json
import math
import os
import shutil
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import UserError, inputs, models, report, workdir
from jaxpost.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    NoIntactCheckpointError,
    abstract_like,
)
from jaxpost.metrics_log import MetricsWriter, read_metrics
from jaxpost.models import hf
from jaxpost.runner import DivergenceWatch, LoopConfig
from jaxpost.tasks import gsm8k
from jaxpost.tokenizers import CharTokenizer

# ---------------------------------------------------------------------------------------------
# divergence


def _watch(rows, **loop):
    """Feed (loss, skipped this step?) rows; return (step, reason) of the first divergence."""
    watch, skipped = DivergenceWatch(LoopConfig(**loop)), 0
    for step, (loss, skip) in enumerate(rows, 1):
        skipped += skip
        reason = watch.observe(step, {"loss": loss, "skipped": skipped, "finite": int(not skip)})
        if reason:
            return step, reason
    return None, watch.finish()


def test_a_streak_of_skipped_steps_is_divergence():
    nan = math.nan
    step, reason = _watch([(2.0, False)] * 3 + [(nan, True)] * 12)
    assert step == 13 and reason.startswith("10 consecutive steps were skipped")
    # skips that do not last are noise: a clean step resets the streak
    assert _watch(([(2.0, False)] + [(nan, True)] * 9) * 5) == (None, None)
    assert _watch([(2.0, False)] * 3 + [(nan, True)] * 12, max_skipped_streak=0) == (None, None)


def test_a_share_of_skipped_steps_over_the_window_is_divergence():
    rows = ([(2.0, False)] + [(math.nan, True)] * 3) * 30  # 75% skipped, never 10 in a row
    step, reason = _watch(rows, skip_window=20)
    assert step == 20 and reason.startswith("15 of the last 20 steps were skipped")
    assert _watch(rows, skip_window=20, max_skipped_share=0.8) == (None, None)


def test_an_exploding_loss_is_divergence():
    step, reason = _watch([(3.0, False), (2.5, False), (4e4, False)])
    assert step == 3 and "exploded to 4e+04" in reason
    # the reference is floored at 1: small losses (GRPO's are near 0) do not trip it
    assert _watch([(1e-4, False), (50.0, False)]) == (None, None)
    assert _watch([(3.0, False), (4e4, False)], loss_explode=0) == (None, None)


def test_parameters_that_blew_up_are_divergence():
    """lr 1e10: the first update moves the parameters ~1e9 x their norm; no loss has seen it."""
    watch = DivergenceWatch(LoopConfig())
    assert watch.params(7.5, 5.6) is None and watch.params(50.0, 0.01) is None  # floored at 1
    assert watch.params(3.2e10, 5.6) == (
        "the parameters' norm grew to 3.2e+10 from 5.6 (more than 100 x)")
    assert watch.params(math.nan, 5.6) is not None
    assert DivergenceWatch(LoopConfig(max_param_growth=0)).params(3.2e10, 5.6) is None


def test_a_short_run_that_ends_skipping_is_divergence():
    """Runs shorter than the streak (the head-to-head's miniature arms) diverge too when at least
    half their steps, up to the last, were skipped."""
    assert _watch([(2.0, False), (math.nan, True)])[1] == (
        "its last 1 of 2 steps were skipped for a non-finite loss or gradient")
    assert _watch([(2.0, False), (math.nan, True), (2.0, False)]) == (None, None)
    assert _watch([(2.0, False)] * 30 + [(math.nan, True)] * 2) == (None, None)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _state(step):
    return {"w": jnp.full((64, 64), float(step)), "step": jnp.asarray(step)}


def _largest_file(root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    with Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step))
    with open(_largest_file(tmp_path / "ckpt" / "3"), "r+b") as f:
        f.truncate(100)  # a copy cut short
    said = []
    with Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        state, step = ckpt.restore_newest_intact(abstract_like(_state(0)), said.append)
        assert step == 2 and float(state["w"][0, 0]) == 2.0
        assert ckpt.all_steps() == [1, 2]
        ckpt.save(3, _state(3))  # the step can be written again
    assert len(said) == 1 and said[0].startswith(f"checkpoint step 3 in {tmp_path / 'ckpt'} could "
                                                 f"not be restored (")  # fmt: skip
    assert said[0].endswith(f"moved it to {tmp_path / 'ckpt.corrupt' / '3'}; resuming from step 2")
    assert os.path.isdir(tmp_path / "ckpt.corrupt" / "3")  # moved aside, not deleted


def test_no_intact_checkpoint_moves_nothing(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, _state(1))
    other = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=_state(0)["w"].sharding)}
    with Checkpointer(tmp_path / "ckpt") as ckpt:  # another model's state: every step fails
        with pytest.raises(NoIntactCheckpointError, match="no checkpoint in .* could be restored"):
            ckpt.restore_newest_intact(other, print)
        assert ckpt.all_steps() == [1]
    assert not os.path.exists(tmp_path / "ckpt.corrupt")


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, _state(1))
        ckpt.wait()
        usage = os.statvfs(tmp_path)
        monkeypatch.setattr("shutil.disk_usage", lambda _: type("U", (), {
            "free": 2**19, "total": usage.f_blocks * usage.f_frsize})())  # fmt: skip
        with pytest.raises(CheckpointWriteError, match=(
                r"no space for checkpoint step 2 in .*ckpt: it needs about 1\.0 MiB, 0\.5 MiB are "
                r"free; the last complete checkpoint is step 1")):  # fmt: skip
            ckpt.save(2, _state(2))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["1"]


# ---------------------------------------------------------------------------------------------
# metrics, workdir, inputs, outputs


def test_a_resumed_run_writes_each_step_once(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 8):
            w.write(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # cut short by the kill
    with MetricsWriter(tmp_path, resume_step=4) as w:  # the checkpoint was at step 4
        for step in range(5, 10):
            w.write(step, {"loss": 2.0 / step})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert rows[3]["loss"] == 0.25 and rows[4]["loss"] == 0.4


def test_one_workdir_lock_per_process_and_clear_refusals(tmp_path):
    path = str(tmp_path / "run")
    assert workdir.claim(path) == path and workdir.claim(path) == path  # re-entrant
    with open(os.path.join(path, workdir.LOCK_FILE)) as f:
        assert f.read().startswith(f"pid {os.getpid()} on ")
    workdir.release(path)
    with workdir.held(path):  # what a program's run holds: released when it returns or raises
        with workdir.held(path):
            pass
        assert os.path.realpath(path) in workdir._held
    assert os.path.realpath(path) not in workdir._held
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="the workdir .*file is a file, not a directory"):
        workdir.claim(str(tmp_path / "file"))
    with pytest.raises(UserError, match="a workdir is needed: pass --workdir=DIR"):
        workdir.claim("")
    with pytest.raises(UserError, match="cannot create the workdir .*file/sub"):
        workdir.claim(str(tmp_path / "file" / "sub"))


def _saved_model(path):
    tok = CharTokenizer()
    config = models.get_config("tiny", vocab_size=tok.vocab_size, n_layers=1)
    params = jax.tree.map(lambda x: np.full(x.shape, 0.01, x.dtype), models.abstract_params(config))
    inputs.save_model(str(path), inputs.Model(config, params, tok, "tiny"))
    return str(path)


def poisoned(good, path):
    """A copy of the checkpoint `good` with one inf in model.norm.weight (as another tool, or a
    diverged run saved without jaxpost's check, would leave it)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(good, path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.norm.weight"][3] = np.inf
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def test_broken_checkpoints_are_named_in_one_line(tmp_path):
    good = _saved_model(tmp_path / "good")
    # saved for the group to read (mkdtemp alone would leave the directory 0700)
    umask = os.umask(0o022)
    try:
        shared = _saved_model(tmp_path / "shared")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(shared, "config.json")).st_mode) == 0o644
    cases = {
        "config.json": (lambda p: p.write_text(p.read_text()[:40]), "is not valid JSON"),
        "model.safetensors": (lambda p: p.write_bytes(p.read_bytes()[:300]), "cannot read"),
    }
    for name, (corrupt, message) in cases.items():
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(good, broken)
        corrupt(broken / name)
        with pytest.raises(UserError, match=f"{message}.*{broken / name}|{broken / name}.*{message}"):
            inputs.load_model(str(broken))
    poisoned(good, tmp_path / "nan")
    with pytest.raises(UserError, match=r"tensor model.norm.weight in .*nan/model.safetensors "
                                        r"holds 1 NaN or infinite values"):  # fmt: skip
        hf.load_hf(str(tmp_path / "nan"))


def test_a_gsm8k_record_without_an_answer_is_named(tmp_path):
    good = {"question": "1 + 1?", "answer": "two\n#### 2"}
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"question": "x"}))
    (tmp_path / "test.jsonl").write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"train.jsonl, record 2: record has no 'answer' field"):
        gsm8k.GSM8K.from_jsonl(str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"))


def _arm(p1, **extra):
    s = {k: {"mean": v} for k, v in dict(p1=p1).items()}
    return {"kind": "arm", "curves": {}, "scalars": {"pass@1": s["p1"]}, "history": [], **extra}


def test_the_report_says_what_it_cannot_show(tmp_path):
    nan = {"mean": math.nan}
    arms = {
        "base": {"kind": "reference", "curves": {"pass@k": {"k": [1, 2], "mean": [math.nan] * 2}},
                 "scalars": {"pass@1": nan, "diversity": nan}, "history": []},
        "sft": _arm(0.0),
        "grpo": {**_arm(0.0), "scalars": {}, "diverged": "grpo diverged at step 2: the loss "
                                                        "exploded"},
    }  # fmt: skip
    metrics = {"arms": arms, "radar_axes": ["pass@1", "diversity", "retention"], "claims": [],
               "smoke_test": True}  # fmt: skip
    paths = report.write_report(str(tmp_path), metrics)
    text = open(paths["report"]).read()
    assert "**Smoke test**" in text and "| grpo | diverged |" in text
    assert "- **grpo**: grpo diverged at step 2: the loss exploded" in text
    assert report.informative_axes(arms, metrics["radar_axes"]) == (
        [], ["pass@1", "diversity", "retention"])
    for key in ("pass_at_k", "radar", "diversity", "training"):
        assert os.path.getsize(paths[key]) > 0
