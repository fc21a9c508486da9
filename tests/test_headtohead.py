"""The head-to-head protocol at miniature size: every arm, the report, resuming, bad settings."""

import json
import os
import shutil

import numpy as np
import pytest
from programs import run

from experiments.configs import paradigms as paradigms_config
from jaxpost import UserError, headtohead
from jaxpost.headtohead import settings


def tiny(workdir, **fields):
    """The seconds-scale protocol (the config's tiny variant) with `a.b=value` fields replaced."""
    c = paradigms_config.get_config("tiny")
    c.workdir = str(workdir)
    for path, value in fields.items():
        node = c
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return c


@pytest.fixture(scope="session")  # once per worker: its tests share one xdist group
def mini(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("headtohead"))
    lines = []
    result = headtohead.run(tiny(workdir), log=lines.append)
    return workdir, result, lines


pytestmark = pytest.mark.xdist_group("headtohead_mini")


@pytest.mark.slow
def test_miniature_protocol_writes_the_report(mini):
    workdir, result, _ = mini
    for name in ("report.md", "metrics.json", "pass_at_k.png", "cot_pass_at_k.png", "radar.png",
                 "diversity_vs_pass1.png", "training.png", "density_locality_diversity.png"):  # fmt: skip
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert list(result["arms"]) == ["base", "teacher", "teacher_degraded", *headtohead.ARMS]
    n = tiny(workdir).eval.samples
    for name, arm in result["arms"].items():
        assert arm["curves"]["pass@k"]["k"] == [1, 2, 4][: len(arm["curves"]["pass@k"]["k"])]
        assert arm["curves"]["pass@k"]["k"][-1] == n
        for axis in headtohead.RADAR_AXES[:5]:
            assert axis in arm["scalars"], (name, axis)
        if arm["kind"] == "arm":
            assert arm["history"] and arm["history"][-1]["step"] == 2
            assert "efficiency" in arm["scalars"] and "state_locality" in arm["scalars"]
    verdicts = {c["verdict"] for c in result["claims"]}
    assert len(result["claims"]) == 16 and verdicts <= {"reproduced", "not reproduced",
                                                       "inconclusive"}  # fmt: skip
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    report = open(os.path.join(workdir, "report.md")).read()
    for name, arm in saved["arms"].items():  # the table is rendered from metrics.json
        p1 = arm["scalars"]["pass@1"]
        assert f"| {name} | {p1['mean']:.3f} [{p1['lo']:.3f}, {p1['hi']:.3f}]" in report
    for claim in saved["claims"]:
        assert claim["evidence"] in report
    for arm in headtohead.ARMS.values():  # every arm's description comes from its table entry
        assert arm.help in saved["settings"]["arms"]
    c = tiny(workdir)
    a = c.arm
    assert saved["settings"]["budget"] == {
        "arm_steps": a.steps, "prompts_per_step": a.prompts_per_step, "group_size": a.group_size,
        "updates_per_batch": a.updates_per_batch,
        "rollouts_per_arm": a.steps * a.prompts_per_step * a.group_size}  # fmt: skip
    assert set(saved["settings"]["wall_seconds_by_stage"]) == {"models", "evaluation",
                                                                "arm_training"}  # fmt: skip
    base_p1 = saved["arms"]["base"]["scalars"]["pass@1"]["mean"]
    bits = {}
    for name, arm in saved["arms"].items():  # paired gains: every problem has both values
        if name == "base":
            assert "gain_vs_base" not in arm
            continue
        gain = arm["gain_vs_base"]["pass@1"]
        assert gain["lo"] <= gain["mean"] <= gain["hi"]
        assert np.isclose(gain["mean"], arm["scalars"]["pass@1"]["mean"] - base_p1)
        assert f"| {name} | {gain['mean']:+.3f} [{gain['lo']:+.3f}, {gain['hi']:+.3f}]" in report
        if name in headtohead.ARMS:
            bits[headtohead.ARMS[name].kind] = arm["supervision_bits_per_token"]
    assert 0 < bits["rl"] < 1 < bits["sft"] < bits["distill"]  # a verdict, a token, a distribution
    assert bits["distill_sampled"] == bits["sft"]  # one teacher logprob of the sampled token
    assert saved["resolution"]["pass@1_mde"] > 0 and "Resolution: with 4 held-out" in report
    for name in ("opd_sampled", "grpo_opd"):  # sampled-token OPD logs its reverse-KL estimate
        assert all(np.isfinite(h["sampled_reverse_kl"]) for h in saved["arms"][name]["history"])
    for name in ("grpo", "grpo_unlikely", "opd_sampled", "grpo_opd"):  # T 0.7, top-p 0.9: π_old ≠ q
        w = saved["arms"][name]["importance"]
        assert 0 < w["ratio_min"] < 1 and w["ratio_min"] <= w["ratio_mean"] <= w["ratio_max"]
        assert f"| {name} | {w['ratio_min']:.3g} |" in report
    assert "importance" not in saved["arms"]["opd_rkl"]
    for name, arm in saved["arms"].items():  # every model but the base: its sparse footprint
        f = arm.get("sparse_footprint")
        assert (f is None) == (name == "base"), name
        if f is not None:
            assert 0 <= f["flip_frac"] <= 1 and f"| {name} | {f['flip_frac']:.4f} ({f['flips']})" \
                in report


@pytest.mark.slow
def test_rerun_reuses_models_and_finished_arms(mini):
    workdir, first, _ = mini
    lines = []
    again = headtohead.run(tiny(workdir), log=lines.append)
    assert sum("reusing" in line for line in lines) == 2 + len(headtohead.ARMS)
    for name in first["arms"]:
        assert again["arms"][name]["scalars"]["pass@1"] == first["arms"][name]["scalars"]["pass@1"]


@pytest.mark.slow
def test_an_interrupted_arm_resumes_from_its_checkpoint(mini):
    workdir, first, _ = mini
    arm_dir = os.path.join(workdir, "arms", "grpo")
    os.remove(os.path.join(arm_dir, "eval.json"))  # as if killed after training, before eval
    lines = []
    again = headtohead.run(tiny(workdir, arms="grpo"), log=lines.append)
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
    c = tiny(copy, arms="sft,opd_rkl", **{"arm.learning_rate": 1e-12})
    lines = []
    again = headtohead.run(c, log=lines.append)
    base = again["arms"]["base"]["scalars"]
    old_key = settings.arm_key(tiny(workdir))
    for arm in ("sft", "opd_rkl"):
        # its checkpoints (trained at the old lr, finished) were not resumed as this run's
        assert any(f"{arm}: " in line and "starting this arm over" in line for line in lines)
        with open(os.path.join(copy, "arms", arm, headtohead.ARM_KEY_FILE)) as f:
            assert f.read() == settings.arm_key(c) != old_key
        stale = os.path.join(copy, "arms", f"{arm}.stale-{old_key}")
        assert os.path.isdir(os.path.join(stale, "checkpoints"))  # moved aside, not deleted
        new, old = again["arms"][arm]["scalars"], first["arms"][arm]["scalars"]
        for name in ("pass@1", "pass@large_k", "diversity", "retention", "steerability"):
            assert new[name]["mean"] == base[name]["mean"] or (
                np.isnan(new[name]["mean"]) and np.isnan(base[name]["mean"])), (arm, name)
        # KL(base || arm) per token is ~ (log-ratio)^2 / 2: float noise of two forward passes
        # gives ~1e-12, an arm trained two steps ~1e-5
        assert new["kl_from_base"]["mean"] < 1e-8 and old["kl_from_base"]["mean"] > 1e-6


@pytest.mark.slow
def test_arms_train_low_rank_adapters_with_lora_rank(mini, tmp_path, monkeypatch):
    from jaxpost import lora

    workdir, _, _ = mini
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    made = []
    real_init = lora.init
    monkeypatch.setattr(lora, "init", lambda *a, **k: made.append(a[1]) or real_init(*a, **k))
    c = tiny(copy, arms="sft,opd_sampled", lora_rank=2, lora_alpha=4.0)
    out = headtohead.run(c, log=lambda line: None)
    assert made == [lora.LoraConfig(rank=2, alpha=4.0)] * 2  # one adapter set per arm
    for arm in ("sft", "opd_sampled"):
        assert out["arms"][arm]["scalars"]["kl_from_base"]["mean"] > 0  # the adapters moved it
    with pytest.raises(UserError, match="bad lora settings"):
        headtohead.run(tiny(copy, lora_rank=-1))
    with pytest.raises(UserError, match="opsd_teacher=ema runs without lora_rank"):
        headtohead.run(tiny(copy, lora_rank=2, **{"arm.opsd_teacher": "ema"}))
    # OPSD's teacher as an EMA of the live policy: the arm is retrained under the new setting
    out = headtohead.run(tiny(copy, arms="opsd", **{"arm.opsd_teacher": "ema"}),
                         log=lambda line: None)  # fmt: skip
    assert out["arms"]["opsd"]["history"][-1]["step"] == 2


@pytest.mark.slow
def test_a_diverged_arm_is_reported_as_diverged(mini, tmp_path):
    workdir, _, _ = mini
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    c = tiny(copy, arms="sft,opd_rkl", **{"arm.learning_rate": 1e10})
    lines = []
    result = headtohead.run(c, log=lines.append)  # the others go on; the run itself succeeds
    for arm in ("sft", "opd_rkl"):
        reason = result["arms"][arm]["diverged"]
        assert reason.startswith(f"{arm} diverged at step 2: the parameters' norm grew to ")
        assert "no model was saved" in reason  # two steps: no loss saw the blown-up parameters
        assert result["arms"][arm]["scalars"] == {} and result["arms"][arm]["history"]
    with open(os.path.join(copy, "metrics.json")) as f:
        assert json.load(f)["arms"]["sft"]["diverged"] == result["arms"]["sft"]["diverged"]
    report = open(os.path.join(copy, "report.md")).read()
    assert "| sft | diverged |" in report
    assert f"- **opd_rkl**: {result['arms']['opd_rkl']['diverged']}" in report
    assert result["claims"] == []  # no verdict rests on a broken arm
    again = headtohead.run(c, log=lines.append)  # a rerun of these settings does not retrain it
    assert any("sft: diverged in an earlier run of these settings" in line for line in lines)
    assert again["arms"]["sft"]["diverged"] == result["arms"]["sft"]["diverged"]


@pytest.mark.slow
def test_main_runs_from_the_command_line(mini):
    workdir, _, _ = mini
    new = "sparse_select,alpha_dpg,spectrum,gad,ovd,qsharp"  # issue 16's (arms the fixture ran)
    out = run("experiments.paradigms", f"--workdir={workdir}", "--mini", f"--arms={new}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| alpha_dpg |" in out.stdout and "report:" in out.stdout
    with open(os.path.join(workdir, "metrics.json")) as f:
        saved = json.load(f)
    for name in new.split(","):
        assert saved["arms"][name]["sparse_footprint"]["flips"] >= 0
        assert saved["arms"][name]["history"], name
    assert any("decision points" in c["claim"] for c in saved["claims"])
    assert "disc_acc" in saved["arms"]["gad"]["history"][-1]  # GAD's discriminator trained
    q, base = saved["arms"]["qsharp"], saved["arms"]["base"]
    assert "value_bce" in q["history"][-1]  # Q♯'s value model trained; its policy is the base's
    assert q["scalars"]["retention"] == base["scalars"]["retention"]  # weights untouched
    both = run("experiments.paradigms", f"--workdir={workdir}", "--mini",
               "--config=experiments/configs/paradigms.py")  # fmt: skip
    assert both.returncode == 1 and "give one of them" in both.stderr
    bad = run("experiments.paradigms", f"--workdir={workdir}", "--config.arms=dpo")
    assert bad.returncode == 1 and "unknown arms ['dpo']" in bad.stderr.strip().splitlines()[-1]


def test_bad_settings_are_refused(tmp_path):
    bad = {("arms", "sft,ppo"): r"unknown arms \['ppo'\]",
           ("arm.group_size", 1): "arm.group_size must be >= 2",
           ("base.style", "widest"): "countdown SFT data: unknown slice style 'widest'",
           ("teacher_style", "wider"): "countdown SFT data: unknown slice style 'wider'",
           ("eval.samples", 1): "eval.samples must be >= 2",
           ("arm.beta_rank", 2.0): r"arm.beta_rank must lie in \[0, 1\]",
           ("teacher_problems", -1): "teacher_problems must be >= 0",
           ("arm.fresh_problems", -2): "arm.fresh_problems must be >= 0",
           ("arm.updates_per_batch", 0): "arm.updates_per_batch must be >= 1"}  # fmt: skip
    for (field, value), match in bad.items():
        c = tiny(tmp_path, **{field: value})
        with pytest.raises(UserError, match=match):
            if field == "arms":
                headtohead.arms.arm_names(c)
            else:  # a bad slice style is found before any training: the plan encodes the data
                settings.check(c) if "style" not in field else headtohead.run(c, log=print)


def test_the_default_design_draws_its_problem_pools():
    c = paradigms_config.get_config()
    c.workdir = "/nonexistent"
    w = headtohead.models.world(c)
    base, fresh = {p.key for p in w.train}, {p.key for p in w.arm_problems}
    assert (len(base), len(fresh), len(w.test)) == (c.base.train_problems, c.arm.fresh_problems,
                                                    c.eval.problems)  # fmt: skip
    assert not base & fresh and not (base | fresh) & {p.key for p in w.test}
    assert base | fresh <= {p.key for p in w.teacher_train}  # the teacher saw them all
    assert c.arm.fresh_problems == c.arm.steps * c.arm.prompts_per_step  # one per prompt draw


def test_more_problems_than_the_task_holds_is_one_line_naming_the_fields():
    c = tiny("/nonexistent", **{"arm.fresh_problems": 1000})  # numbers in [1, 12]: ~790 train
    with pytest.raises(UserError, match=r"only \d+: ask for fewer.* max\(base.train_problems "
                                        r"\+ arm.fresh_problems, teacher_problems\) = 1040"):
        headtohead.models.world(c)


def test_the_teachers_problems_hold_the_bases():
    c = tiny("/nonexistent", teacher_problems=60)
    w = headtohead.models.world(c)
    assert len(w.train) == c.base.train_problems < len(w.teacher_train) == 60
    assert w.teacher_train[: len(w.train)] == w.train  # the base's problems and more
    assert len(headtohead.models.mixture(w, "all", 0, w.teacher_train)) > len(
        headtohead.models.mixture(w, "all", 0))  # fmt: skip
    assert w.arm_problems == w.train  # the arms train on the base's problems by default


def test_fresh_problems_are_ones_the_base_never_saw():
    c = tiny("/nonexistent", teacher_problems=60, **{"arm.fresh_problems": 30})
    w = headtohead.models.world(c)
    n = c.base.train_problems
    assert len(w.arm_problems) == 30 and w.teacher_train[:n] == w.train
    assert not {p.key for p in w.arm_problems} & {p.key for p in w.train}
    assert w.arm_problems == headtohead.models.world(
        tiny("/nonexistent", teacher_problems=n + 30)).teacher_train[n:]  # the draw's next 30


def test_adding_an_arm_is_one_table_entry(tmp_path, monkeypatch):
    """A new arm needs nothing but its entry: the settings accept it, the report lists it with
    its help, and the claims count it as on-policy."""
    arm = headtohead.Arm("opd_rkl_copy", "reverse-KL OPD, a second time", "distill", True,
                         headtohead.ARMS["opd_rkl"].build)  # fmt: skip
    monkeypatch.setitem(headtohead.ARMS, arm.name, arm)
    c = tiny(tmp_path, arms="opd_rkl_copy")
    settings.check(c)
    assert headtohead.arms.arm_names(c) == ("opd_rkl_copy",)
    per_problem = {"pass@1": [0.2] * 4, "pass@large_k": [0.5] * 4, "diversity": [1.0] * 4,
                   "retention": [0.5] * 4}  # fmt: skip
    scalars = {k: {"mean": float(np.mean(v))} for k, v in per_problem.items()}
    evals = {name: headtohead.Evaluation({}, scalars, per_problem)
             for name in ("base", "sft", arm.name)}  # fmt: skip
    w = headtohead.models.World(config=c, task=None, retention=None, steer=None, train=[],
                                test=[], retention_test=[], steer_test=[])  # fmt: skip
    w.task = type("T", (), {"describe": lambda self: "a task"})()
    report = headtohead.protocol.assemble(w, evals, {}, {}, {"student": "", "base": "",
                                                             "teacher": ""})  # fmt: skip
    assert "opd_rkl_copy (reverse-KL OPD, a second time)" in report["settings"]["arms"]
    assert report["arms"][arm.name]["kind"] == "arm"
    retention = [x for x in report["claims"] if "retain" in x["claim"]]
    assert retention and "opd_rkl_copy" in json.dumps(retention)


def test_cache_keys_are_derived_from_the_settings(tmp_path, monkeypatch):
    c = tiny(tmp_path)
    keys = (settings.model_key(c), settings.arm_key(c), settings.eval_key(c))
    c.eval.samples = 8  # evaluation only: models and arms are reused
    assert (settings.model_key(c), settings.arm_key(c)) == keys[:2]
    assert settings.eval_key(c) != keys[2]
    c.arm.steps = 3  # an arm setting: models reused, arms retrained
    assert settings.model_key(c) == keys[0] and settings.arm_key(c) != keys[1]
    c.base.steps = 7  # a base setting: everything rebuilt
    assert settings.model_key(c) != keys[0]
    c = tiny(tmp_path / "elsewhere", arms="grpo", progress=True)  # never part of a key
    assert (settings.model_key(c), settings.arm_key(c), settings.eval_key(c)) == keys
    monkeypatch.setattr(settings, "EVALUATION_FORMAT", settings.EVALUATION_FORMAT + 1)
    assert (settings.model_key(c), settings.arm_key(c)) == keys[:2]  # a new eval.json format:
    assert settings.eval_key(c) != keys[2]  # every model re-evaluated, nothing retrained
