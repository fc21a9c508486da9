"""The head-to-head protocol at miniature size: every arm, the report, resuming, bad settings."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxpost import paradigms


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("paradigms"))
    lines = []
    result = paradigms.run(paradigms.miniature(workdir), log=lines.append)
    return workdir, result, lines


@pytest.mark.slow
def test_miniature_protocol_writes_the_report(mini):
    workdir, result, _ = mini
    for name in ("report.md", "metrics.json", "pass_at_k.png", "cot_pass_at_k.png", "radar.png",
                 "diversity_vs_pass1.png", "training.png"):  # fmt: skip
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert list(result["arms"]) == ["base", "teacher", *paradigms.ARMS]
    n = paradigms.miniature(workdir).eval_samples
    for name, arm in result["arms"].items():
        assert arm["curves"]["pass@k"]["k"] == [1, 2, 4][: len(arm["curves"]["pass@k"]["k"])]
        assert arm["curves"]["pass@k"]["k"][-1] == n
        for axis in paradigms.RADAR_AXES[:5]:
            assert axis in arm["scalars"], (name, axis)
        if arm["kind"] == "arm":
            assert arm["history"] and arm["history"][-1]["step"] == 2
            assert "efficiency" in arm["scalars"] and "state_locality" in arm["scalars"]
    verdicts = {c["verdict"] for c in result["claims"]}
    assert len(result["claims"]) == 6 and verdicts <= {"reproduced", "not reproduced",
                                                       "inconclusive"}  # fmt: skip
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    report = open(os.path.join(workdir, "report.md")).read()
    for name, arm in saved["arms"].items():  # the table is rendered from metrics.json
        p1 = arm["scalars"]["pass@1"]
        assert f"| {name} | {p1['mean']:.3f} [{p1['lo']:.3f}, {p1['hi']:.3f}]" in report
    for claim in saved["claims"]:
        assert claim["evidence"] in report


@pytest.mark.slow
def test_rerun_reuses_models_and_finished_arms(mini):
    workdir, first, _ = mini
    lines = []
    again = paradigms.run(paradigms.miniature(workdir), log=lines.append)
    assert sum("reusing" in line for line in lines) == 2 + len(paradigms.ARMS)
    for name in first["arms"]:
        assert again["arms"][name]["scalars"]["pass@1"] == first["arms"][name]["scalars"]["pass@1"]


@pytest.mark.slow
def test_an_interrupted_arm_resumes_from_its_checkpoint(mini):
    workdir, first, _ = mini
    arm_dir = os.path.join(workdir, "arms", "grpo")
    os.remove(os.path.join(arm_dir, "eval.json"))  # as if killed after training, before eval
    lines = []
    again = paradigms.run(paradigms.miniature(workdir, arms=("grpo",)), log=lines.append)
    assert not any("grpo: reusing" in line for line in lines)
    a, b = first["arms"]["grpo"]["scalars"], again["arms"]["grpo"]["scalars"]
    assert a["pass@1"] == b["pass@1"] and a["kl_from_base"] == b["kl_from_base"]


@pytest.mark.slow
def test_an_arm_trained_under_other_settings_is_started_over(mini, tmp_path):
    workdir, first, _ = mini
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    # A learning rate too small to move a float32 parameter: the retrained arms are the base, so
    # they must evaluate exactly as the base does (no asymmetry between the arm and base paths).
    s = paradigms.miniature(copy, arms=("sft", "opd_rkl"), arm_lr=1e-12)
    lines = []
    again = paradigms.run(s, log=lines.append)
    base = again["arms"]["base"]["scalars"]
    for arm in s.arms:
        # its checkpoints (trained at the old lr, finished) were not resumed as this run's
        assert any(f"{arm}: " in line and "starting this arm over" in line for line in lines)
        with open(os.path.join(copy, "arms", arm, paradigms.ARM_KEY_FILE)) as f:
            assert f.read() == s.arm_key() != paradigms.miniature(workdir).arm_key()
        stale = os.path.join(copy, "arms", f"{arm}.stale-{paradigms.miniature(workdir).arm_key()}")
        assert os.path.isdir(os.path.join(stale, "checkpoints"))  # moved aside, not deleted
        new, old = again["arms"][arm]["scalars"], first["arms"][arm]["scalars"]
        for name in ("pass@1", "pass@large_k", "diversity", "retention", "steerability"):
            assert new[name]["mean"] == base[name]["mean"] or (
                np.isnan(new[name]["mean"]) and np.isnan(base[name]["mean"])), (arm, name)
        assert abs(new["kl_from_base"]["mean"]) < 1e-5  # float noise of two forward passes
        assert abs(old["kl_from_base"]["mean"]) > 1e-3  # the old arm had moved


@pytest.mark.slow
def test_main_runs_from_the_command_line(mini):
    workdir, _, _ = mini
    env = {**os.environ, "XLA_FLAGS": "", "NO_GCE_CHECK": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.paradigms", f"--workdir={workdir}", "--mini",
         "--arms=sft,opd_rkl", "--noprogress"],
        env=env, capture_output=True, text=True, timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| opd_rkl |" in out.stdout and "report:" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "experiments.paradigms", "--arms=dpo"], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # fmt: skip
    assert bad.returncode != 0 and "unknown arms ['dpo']" in bad.stderr


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown arms"):
        paradigms.Settings(workdir=str(tmp_path), arms=("sft", "ppo"))
    with pytest.raises(ValueError, match="group_size"):
        paradigms.Settings(workdir=str(tmp_path), group_size=1)
    with pytest.raises(ValueError, match="style"):
        paradigms.Settings(workdir=str(tmp_path), base_style="widest")
    with pytest.raises(ValueError, match="eval_samples"):
        paradigms.Settings(workdir=str(tmp_path), eval_samples=1)


def test_claim_verdicts_follow_the_paired_interval():
    base = {"pass@1": [0.1] * 8, "pass@large_k": [0.9] * 8, "diversity": [1.0] * 8,
            "retention": [0.5] * 8}  # fmt: skip
    grpo = {"pass@1": [0.5] * 8, "pass@large_k": [0.6] * 8, "diversity": [0.2] * 8,
            "retention": [0.5] * 8}  # fmt: skip
    evals = {name: paradigms.Evaluation({}, {}, pp) for name, pp in
             (("base", base), ("grpo", grpo), ("opd_rkl", grpo))}  # fmt: skip
    by_claim = {c["claim"]: c["verdict"] for c in paradigms.claims(evals)}
    assert by_claim["RLVR (GRPO) beats the base at pass@1 but the base overtakes it at large k"] \
        == "reproduced"
    assert by_claim["reverse-KL OPD narrows diversity (solution entropy) below the base"] \
        == "reproduced"
    flipped = {name: paradigms.Evaluation({}, {}, pp) for name, pp in
               (("base", grpo), ("grpo", base))}  # fmt: skip
    (claim,) = paradigms.claims(flipped)
    assert claim["verdict"] == "not reproduced"  # GRPO is ahead at large k
    assert "base−GRPO -0.300" in claim["evidence"]


def test_flags_become_settings(tmp_path):
    from absl import flags

    from experiments import paradigms as main

    fv = flags.FlagValues()
    main.define_flags(fv)
    fv(["prog", f"--workdir={tmp_path}", "--arms=grpo,opd_rkl", "--arm_steps=45",
        "--mesh=1,8,1", "--loss_impl=xla"])  # fmt: skip
    s = main.settings_from_flags(fv)
    assert (s.arms, s.arm_steps, s.mesh, s.loss_impl) == (("grpo", "opd_rkl"), 45, "1,8,1", "xla")
    assert (s.base_steps, s.arm_lr) == (paradigms.BUILT_IN_DEFAULTS["base_steps"],
                                        paradigms.BUILT_IN_DEFAULTS["arm_lr"])  # fmt: skip
    fv = flags.FlagValues()
    main.define_flags(fv)
    fv(["prog", f"--workdir={tmp_path}", "--mini", "--arm_steps=3", "--seed=2"])
    s = main.settings_from_flags(fv)
    mini = paradigms.miniature(str(tmp_path))
    assert (s.arm_steps, s.seed, s.eval_samples) == (3, 2, mini.eval_samples)
