"""The benchmark scripts run as printed and say what they measure (timings themselves are not
tested: they live in benchmarks/)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_train_prints_one_floor_line_per_objective():
    out = subprocess.run([sys.executable, "scripts/bench_train.py", "--variant", "tiny",
                          "--repeats", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "NO_GCE_CHECK": "true"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert [x["objective"] for x in lines] == ["sft", "grpo", "opd"]
    for x in lines:
        assert x["model_flops"] > 0 and 0 < x["floor_ratio"] < 5
        assert x["floor_ratio"] == pytest.approx(x["matmul_s"] / x["step_s"], rel=0.01)
        assert x["model_flops_per_s"] == pytest.approx(x["model_flops"] / x["step_s"], rel=0.01)
        assert 0 <= x["padding_share"] < 1
    # the opd step also runs the teacher's forward: a third more flops than grpo's
    assert lines[2]["model_flops"] == pytest.approx(lines[1]["model_flops"] * 4 / 3)


@pytest.mark.slow
def test_bench_kernels_topk_prints_the_teacher_memory_lines():
    out = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--topk", "--rows", "64",
                          "--width", "16", "--vocab", "5000", "--k", "8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    got = {(x["stage"], x["impl"]): x for x in lines}
    assert set(got) == {(s, i) for s in ("scoring", "student_step") for i in ("full", "topk")}
    for stage in ("scoring", "student_step"):
        full, top = got[stage, "full"], got[stage, "topk"]
        assert full["teacher_bytes"] == 64 * 5000 * 4  # the [N, V] float32 logits
        assert top["teacher_bytes"] <= 64 * (2 * 8 + 1) * 4 + 64  # ids, logprobs, tail
        assert top["ratio_to_full"] == pytest.approx(
            (top["teacher_bytes"] + top["temp_bytes"]) / (full["teacher_bytes"] + full["temp_bytes"]),
            abs=1e-4)  # fmt: skip


def test_bench_train_floor_runs_every_dot_it_counts():
    # The floor must execute what model_flops counts: three dots per trained dot (forward and
    # two gradients), one per frozen dot. A chain whose results are unused is dead code XLA
    # drops (an earlier chain ran only the gradient dots: 2/3 of the sft floor's FLOPs, 1/2 of
    # opd's), which makes the floor look faster than any step could be.
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("bench_train", f"{ROOT}/scripts/bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    trained = [(1, 64, 16, 32), (1, 64, 32, 16), (4, 32, 8, 32)]
    frozen = [(1, 64, 16, 32), (4, 32, 8, 32)]
    chain = bench_train.matmul_chain(trained, frozen)
    hlo = chain.func.lower(*chain.args).compile().as_text()
    assert len(re.findall(r"\bdot\(", hlo)) == 3 * len(trained) + len(frozen)
    results, (da, db) = chain()
    assert da.shape == (1, 64, 16) and db.shape == (1, 16, 32)  # the first dot's gradients, last


def test_bench_sampler_floor_streams_each_layers_weights_over_the_samplers_windows():
    # The floor is the sampler's matmuls with its memory traffic: each layer its own weights (one
    # set reused by every layer stays in cache and made an earlier floor ~1.3x too fast), keys
    # laid out [B·K, E, S] as the cache holds them, one window per decode segment.
    import importlib.util

    from jaxpost import models, sampler

    spec = importlib.util.spec_from_file_location("bench_sampler", f"{ROOT}/scripts/bench_sampler.py")
    bench_sampler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_sampler)
    config = models.get_config("tiny")
    floor = bench_sampler.matmul_floor(config, batch=8, prompt=8, new=64)
    w, windows, _ = floor.args
    assert len(w["layers"]) == config.n_layers
    leaves = [id(x) for layer in w["layers"] for x in layer.values()]
    assert len(set(leaves)) == len(leaves)
    K, E = config.n_kv_heads, config.head_dim
    assert [k.shape for k, _ in windows] == [(config.n_layers, 8 * K, E, 8 + end)
                                             for end in sampler.segment_ends(64)]  # fmt: skip
    assert [v.shape for _, v in windows] == [(config.n_layers, 8 * K, 8 + end, E)
                                             for end in sampler.segment_ends(64)]  # fmt: skip
    assert floor().shape == (8, config.d_model)


@pytest.mark.slow
def test_bench_sampler_prints_the_summary_it_documents():
    out = subprocess.run([sys.executable, "scripts/bench_sampler.py", "--layers", "1", "--width",
                          "64", "--vocab", "128", "--batch", "8", "--prompt", "8", "--new", "24",
                          "--repeats", "1", "--torch-threads", "1"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "NO_GCE_CHECK": "true"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    summary = lines[-1]
    assert summary["bench"] == "sampler_summary"
    runs = {x["impl"]: x for x in lines[:-1]}
    assert set(runs) == {"jaxpost", "floor", "transformers@1"}
    assert summary["floor_ratio"] == pytest.approx(runs["jaxpost"]["seconds"]
                                                   / runs["floor"]["seconds"], rel=0.01)  # fmt: skip
    assert summary["speedup_vs_transformers"] == pytest.approx(
        runs["jaxpost"]["decode_tokens_per_s"] / runs["transformers@1"]["decode_tokens_per_s"],
        rel=0.02)  # fmt: skip
    assert summary["floor_tokens_per_s"] == pytest.approx(runs["floor"]["decode_tokens_per_s"],
                                                          rel=0.02)  # fmt: skip


def _profile_ops(*args):
    out = subprocess.run([sys.executable, "scripts/profile_ops.py", *args, "--runs", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_GCE_CHECK": "true"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]


@pytest.mark.slow
def test_profile_ops_joins_the_samplers_thunks_to_its_hlo():
    lines = _profile_ops("sampler", "--layers", "2", "--width", "64", "--vocab", "128",
                         "--batch", "8", "--prompt", "8", "--new", "16", "--top", "0")  # fmt: skip
    *rows, summary = lines
    assert summary["bench"] == "profile_ops_summary" and "generate_program" in summary["module"]
    assert summary["groups"] == len(rows) and summary["ops_per_run"] > 16  # a step is many ops
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=0.01)
    assert summary["op_ms_per_run"] == pytest.approx(sum(r["us_per_run"] for r in rows) / 1e3,
                                                     rel=0.01)  # fmt: skip
    # the LM head: 8 rows against the tied [128, 64] table, once per decode step and prefill
    head = [r for r in rows if "f32[8,128] = f32[8,64] x f32[128,64]" in r["op"]]
    assert head and sum(r["calls_per_run"] for r in head) == 16 + 1
    assert all(r["us_per_step"] == pytest.approx(r["us_per_run"] / 16, abs=0.01) for r in rows)


@pytest.mark.slow
def test_profile_ops_profiles_a_train_step():
    *rows, summary = _profile_ops("sft", "--variant", "tiny", "--top", "5")
    assert len(rows) == 5 and summary["target"] == "sft" and "jit_step" in summary["module"]
    assert rows == sorted(rows, key=lambda r: -r["us_per_run"])
