"""The head-to-head from Hugging Face checkpoints (--model / --teacher) on GSM8K and Countdown,
sharded over a mesh with the fused OPD loss (the Pallas GPU kernel, interpreted on CPU, run
per device inside shard_map), and the errors a user gets for bad scale settings.

Everything is built here (tests/assets.py): a byte-level BPE tokenizer, tiny random Qwen2
checkpoints (a student and a differently shaped teacher; one family, because transformers picks
the tokenizer class by model type, so a Llama beside a Qwen2 would tokenize the same files
differently, which the tokenizer check rightly refuses) and GSM8K-format JSONL.
"""

import json
import os
import shutil

import numpy as np
import pytest
from assets import bpe_tokenizer, checkpoint, gsm8k_assets
from programs import run
from test_headtohead import tiny

from jaxpost import UserError, headtohead, ovd
from jaxpost.headtohead import protocol, settings

pytest.importorskip("transformers")
pytestmark = pytest.mark.xdist_group("headtohead_pretrained")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return gsm8k_assets(tmp_path_factory.mktemp("pretrained"))


def pretrained(workdir, assets, **fields):
    """The tiny protocol with the pretrained variant's defaults and the test checkpoints."""
    return tiny(workdir, **{"variant": "pretrained", "model": assets["student"],
                            "model_overrides": "", "base.steps": 0, "arm.learning_rate": 1e-6,
                            "arm.max_new_tokens": 24, **fields})


@pytest.mark.slow
def test_gsm8k_from_checkpoints_on_a_mesh_with_the_fused_loss(assets, tmp_path):
    c = pretrained(tmp_path / "run", assets, teacher=assets["teacher"], mesh="2,2,2",
                   loss_impl="pallas_gpu", arms="sft,grpo,opd_rkl,opsd",
                   **{"task.name": "gsm8k", "task.data_dir": assets["gsm8k"]})  # fmt: skip
    lines = []
    result = headtohead.run(c, log=lines.append)
    assert list(result["arms"]) == ["base", "teacher", "sft", "grpo", "opd_rkl", "opsd"]
    assert "steerability" not in result["radar_axes"] and len(result["radar_axes"]) == 5
    s = result["settings"]
    assert assets["student"] in s["student"] and assets["teacher"] in s["teacher"]
    assert s["task"].startswith("GSM8K, ") and "mesh 2,2,2" in s["devices"]
    for name, arm in result["arms"].items():
        sc = arm["scalars"]
        assert "steerability" not in sc
        for key in ("pass@1", "pass@large_k", "retention", "cot_pass@1"):
            assert np.isfinite(sc[key]["mean"]), (name, key)
        assert "diversity" in sc  # NaN while no sample is right (random weights)
        if arm["kind"] == "arm":
            assert np.isfinite(sc["kl_from_base"]["mean"]) and sc["kl_from_base"]["mean"] != 0
            assert np.isfinite(sc["efficiency"]["mean"])
            assert arm["history"][-1]["step"] == c.arm.steps
    # the base is the student checkpoint as it is; nothing was pretrained or cached for it
    assert not any("base (SFT" in line for line in lines)
    assert not os.path.exists(os.path.join(c.workdir, "models", settings.model_key(c), "base"))
    for name in ("report.md", "metrics.json", "pass_at_k.png", "cot_pass_at_k.png", "radar.png"):
        assert os.path.getsize(os.path.join(c.workdir, name)) > 0, name
    with open(os.path.join(c.workdir, "metrics.json")) as f:
        assert json.load(f)["settings"]["task"] == s["task"]


@pytest.mark.slow
def test_countdown_from_a_checkpoint_trains_its_teacher_and_caches_it(assets, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    c = pretrained(tmp_path / "run", assets, teacher_steps=2, arms="opd_rkl,ovd")
    asked = []  # OVD asks the pretrained teacher for its score in words

    def scorer(*args, make=ovd.verbal_scorer):
        score = make(*args)
        return lambda problems, completions: asked.append(len(problems)) or score(problems,
                                                                                  completions)

    monkeypatch.setattr(ovd, "verbal_scorer", scorer)
    first = headtohead.run(c, log=lambda _: None)
    assert asked and all(n == c.arm.prompts_per_step * c.arm.group_size for n in asked)
    assert all(0 <= h["ovd_score"] <= 9 for h in first["arms"]["ovd"]["history"])
    teacher_dir = os.path.join(c.workdir, "models", settings.model_key(c), "teacher")
    assert os.path.exists(os.path.join(teacher_dir, "config.json"))
    assert os.path.exists(os.path.join(teacher_dir, "tokenizer.json"))  # reloadable on its own
    assert "steerability" in first["radar_axes"]
    again = []
    second = headtohead.run(c, log=again.append)
    assert any(f"reusing {teacher_dir}" in line for line in again)
    assert second["arms"]["opd_rkl"]["scalars"]["pass@1"] == first["arms"]["opd_rkl"]["scalars"][
        "pass@1"]  # fmt: skip


def test_bad_scale_settings_name_the_problem(assets, tmp_path):
    w = tmp_path
    cases = [
        (tiny(w, model=assets["student"], model_overrides=""), "pretrained defaults"),
        (tiny(w, model=os.path.join(w, "missing"), variant="pretrained"),
         "model directory not found"),
        (tiny(w, teacher=str(w)), "teacher directory not found"),
        (tiny(w, **{"base.steps": 0}), "base.steps >= 1"),
    ]  # fmt: skip
    for c, match in cases:
        with pytest.raises(UserError, match=match):
            settings.check(c)
    runs = [
        (tiny(w / "t", **{"task.name": "gsm8k", "task.data_dir": assets["gsm8k"]}),
         "task gsm8k needs a pretrained --model"),  # the task says so (`needs_pretrained`)
        (pretrained(w / "a", assets, **{"task.name": "gsm8k"}), "task gsm8k needs exactly one of"),
        (pretrained(w / "b", assets, **{"task.name": "gsm8k", "task.data_dir": str(w)}),
         "GSM8K file not found"),
        (pretrained(w / "c", assets, **{"task.name": "math"}), "unknown task 'math'"),
        (pretrained(w / "d", assets, dtype="bf16"), "unknown dtype 'bf16'"),
        (pretrained(w / "e", assets, loss_impl="cuda"), "unknown loss_impl 'cuda'"),
        (tiny(w / "f", mesh="2,2,2,2"), "mesh"),
        (tiny(w / "g", mesh="4,4,4"), "mesh '4,4,4' on 8 devices"),
        # prompts plus completions longer than the model's context
        (pretrained(w / "h", assets, teacher=assets["teacher"], **{
            "task.name": "gsm8k", "task.data_dir": assets["gsm8k"], "arm.max_new_tokens": 250}),
         "max_seq_len 256"),
    ]  # fmt: skip
    for c, match in runs:
        with pytest.raises(UserError, match=match):
            headtohead.run(c, log=lambda _: None)
    # a teacher whose vocabulary differs from the student's
    other = bpe_tokenizer(w / "tok2", ["completely different text 123"] * 4)
    odd = checkpoint(w / "odd", other, "qwen2", seed=3)
    with pytest.raises(UserError, match="must share one tokenizer and vocabulary"):
        headtohead.run(pretrained(w / "i", assets, teacher=odd), log=lambda _: None)


def test_inputs_found_bad_at_run_time_are_user_errors(assets, tmp_path):
    bare = tmp_path / "bare"  # a checkpoint directory without its tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(assets["student"], name), bare / name)
    with pytest.raises(UserError, match=f"no tokenizer in {bare}"):
        headtohead.run(pretrained(tmp_path / "a", assets, model=str(bare)), log=lambda _: None)


def test_a_multi_process_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(protocol.jax, "process_count", lambda: 4)
    with pytest.raises(UserError, match="runs in one process.*4 processes"):
        headtohead.run(tiny(tmp_path))
    assert not os.path.exists(tmp_path / "models")


@pytest.mark.slow
def test_the_program_reports_bad_inputs_in_one_line(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    proc = run("experiments.paradigms", f"--workdir={tmp_path / 'w'}", f"--model={bare}",
               "--config=experiments/configs/paradigms.py:pretrained")  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("experiments.paradigms: error: unsupported architecture"), lines
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_rewritten_in_place_is_not_served_from_the_cache(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    c = tiny(tmp_path / "w", model=str(ckpt), teacher=str(ckpt), variant="pretrained")
    keys = (settings.model_key(c), settings.arm_key(c))
    os.utime(ckpt / "model.safetensors", ns=(1, 1))  # touched (or copied): contents unchanged
    assert (settings.model_key(c), settings.arm_key(c)) == keys
    (ckpt / "model.safetensors").write_bytes(b"Weights")  # rewritten in place, same size
    assert settings.model_key(c) != keys[0] and settings.arm_key(c) != keys[1]
    # the built-in protocol's keys do not depend on any file
    assert settings.model_key(tiny(tmp_path / "w")) == settings.model_key(tiny("elsewhere"))
