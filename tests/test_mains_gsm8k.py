"""Every main on a real checkpoint and a real dataset layout, as a user types it:

    python -m experiments.<main> --model=DIR --task=gsm8k --config.task.data_dir=DIR --mesh=...

with a tiny random Qwen2 checkpoint (its BPE tokenizer beside it) and GSM8K JSONL, the `tiny`
config variant for seconds-scale budgets, on two CPU devices (FSDP: the weights split over the
mesh, the batch too); SFT and OPD through the fused-linear losses, GRPO through materialized logits.
"""

import json
import os

import pytest
from assets import gsm8k_assets
from programs import run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gsm8k_mains")]
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return gsm8k_assets(tmp_path_factory.mktemp("gsm8k_mains"))


def _main(main, assets, workdir, *extra):
    args = [f"--config=experiments/configs/{main}.py:tiny", f"--model={assets['student']}",
            "--task=gsm8k", f"--config.task.data_dir={assets['gsm8k']}", "--mesh=1,2,1",
            f"--workdir={workdir}", "--config.eval.max_new_tokens=24", *extra]  # fmt: skip
    p = run(f"experiments.{main}", *args, devices=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mesh data=1,fsdp=2,tensor=1" in p.stdout
    with open(os.path.join(workdir, "eval.json")) as f:
        results = json.load(f)["results"]
    assert all("gsm8k" in per_task for per_task in results.values()), results.keys()
    assert os.path.isfile(os.path.join(workdir, "model", "tokenizer.json"))
    return p


def test_sft_on_gsm8k(assets, tmp_path):
    p = _main("sft", assets, tmp_path / "sft", "--config.data.train_problems=32",
              "--config.loss_impl=fused_linear")  # the cross-entropy from hidden states
    assert "gsm8k problems" in p.stdout


def test_grpo_on_gsm8k(assets, tmp_path):
    p = _main("grpo", assets, tmp_path / "grpo", "--config.sampling.max_new_tokens=24",
              "--config.train_problems=32")  # fmt: skip
    assert "grpo: rollout pass rate" in p.stdout


def test_opd_on_gsm8k(assets, tmp_path):
    p = _main("opd", assets, tmp_path / "opd", f"--teacher={assets['teacher']}",
              "--config.sampling.max_new_tokens=24", "--config.train_problems=32",
              "--config.loss_impl=fused_linear")  # the divergence from both models' hidden states
    assert "opd: loss" in p.stdout
