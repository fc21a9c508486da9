"""The report renders every plot and table from a metrics dictionary, and nothing else."""

import json
import os

import numpy as np

from jaxpost import report


def _metrics():
    rng = np.random.default_rng(0)
    arms = {}
    for i, name in enumerate(["base", "teacher", "sft", "grpo", "opd_rkl"]):
        k = [1, 2, 4, 8, 16]
        mean = np.clip(0.2 + 0.1 * i + 0.1 * np.log2(k), 0, 1)
        arms[name] = {
            "kind": "reference" if name in ("base", "teacher") else "arm",
            "curves": {
                "pass@k": {
                    "k": k,
                    "mean": mean.tolist(),
                    "lo": (mean - 0.05).tolist(),
                    "hi": (mean + 0.05).tolist(),
                },
                "cot_pass@k": {"k": k, "mean": (mean * 0.8).tolist()},
            },
            "scalars": {
                "pass@1": {
                    "mean": float(mean[0]),
                    "lo": float(mean[0] - 0.05),
                    "hi": float(mean[0] + 0.05),
                },
                "pass@large_k": {"mean": float(mean[-1])},
                "diversity": {"mean": float(rng.uniform()), "lo": 0.0, "hi": 1.0},
                "retention": {"mean": float(rng.uniform())},
                "steerability": {"mean": float(rng.uniform())},
                "efficiency": {"mean": float(rng.uniform())},
            },
            "history": []
            if name in ("base", "teacher")
            else [{"step": s, "loss": 1.0 / s, "pass_rate": 0.1 * s} for s in range(1, 6)],
        }
    return {
        "arms": arms,
        "radar_axes": [
            "pass@1",
            "pass@large_k",
            "diversity",
            "retention",
            "steerability",
            "efficiency",
        ],
        "claims": [{"claim": "c", "source": "s", "verdict": "inconclusive", "evidence": "e"}],
        "settings": {"seed": 0},
    }


def test_write_report_produces_all_files(tmp_path):
    m = _metrics()
    paths = report.write_report(str(tmp_path), m)
    for key, path in paths.items():
        assert os.path.getsize(path) > 0, key
    text = open(paths["report"]).read()
    assert "| grpo |" in text and "**inconclusive**" in text and "pass_at_k.png" in text
    # Numbers in the table are those of the metrics dict.
    assert f"{m['arms']['sft']['scalars']['pass@1']['mean']:.3f}" in text
    assert json.load(open(paths["metrics"]))["arms"].keys() == m["arms"].keys()


def test_radar_normalisation_puts_the_best_arm_on_the_rim():
    m = _metrics()
    vals = report.radar_values(m["arms"], m["radar_axes"])
    for j in range(len(m["radar_axes"])):
        col = [v[j] for v in vals.values()]
        assert min(col) == 0.0 and max(col) == 1.0
