"""The plasticity study (jaxpost.plasticity): starting points, the predictors' ranking against a
direct computation, and the main end to end at tiny size."""

import json
import os

import numpy as np
import pytest
from programs import run

from experiments.configs import plasticity as plasticity_config
from jaxpost import UserError, metrics, plasticity


def test_starting_points_take_the_base_once():
    c = plasticity_config.get_config()
    assert plasticity.starting_points(c) == [(0, "base"), (100, "all"), (100, "first"),
                                             (400, "all"), (400, "first")]  # fmt: skip
    for steps, styles, match in (("1,x", "all", "must list integers"), ("0,5", "all", "at least 3"),
                                 ("-1,2,3", "all", "sft_steps >= 0")):  # fmt: skip
        c.plasticity.sft_steps, c.plasticity.styles = steps, styles
        with pytest.raises(UserError, match=match):
            plasticity.starting_points(c)


def test_predictor_ranks_match_a_direct_computation():
    rng = np.random.default_rng(0)
    post = rng.uniform(0, 1, size=(4, 30))
    points = [{"post_rl_pass@1": post[i].tolist(),
               "sft_pass@1": (post[i] * 0.5 + 0.1 * i).tolist(),  # tracks post-RL
               "sft_pass@large_k": rng.uniform(size=30).tolist(),
               "heldout_nll": (2.0 - post[i]).tolist()}  # lower where post-RL is higher
              for i in range(4)]  # fmt: skip
    out = plasticity.rank_predictors(points, resamples=300, seed=1)
    for name in plasticity.PREDICTORS:
        x = np.asarray([np.mean(p[name]) for p in points])
        want = metrics.spearman(-x if name == "heldout_nll" else x, post.mean(1))
        assert out[name]["rho"] == pytest.approx(want)
        assert out[name]["lo"] <= out[name]["hi"]
    assert out["heldout_nll"]["rho"] == pytest.approx(1.0)  # negated: a perfect predictor


@pytest.mark.slow
def test_the_main_writes_the_study_and_reuses_its_points(tmp_path):
    args = ("experiments.plasticity", "--config=experiments/configs/plasticity.py:tiny",
            f"--workdir={tmp_path}")  # fmt: skip
    out = run(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| sft4_all | 4 | all |" in out.stdout and "heldout_nll" in out.stdout
    for name in ("plasticity.md", "plasticity.json", "plasticity.png"):
        assert os.path.getsize(os.path.join(tmp_path, name)) > 0
    with open(os.path.join(tmp_path, "plasticity.json")) as f:
        saved = json.load(f)
    assert [p["name"] for p in saved["points"]] == ["base", "sft2_all", "sft4_all"]
    assert all(p["heldout_nll"] > 0 for p in saved["points"])
    again = run(*args)
    assert again.returncode == 0 and again.stdout.count("reusing") >= 3
