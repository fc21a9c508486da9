"""The single-paradigm programs: miniature runs end to end, flags and configs, and one-line errors
for bad flags and inputs.

The end-to-end tests use the configs' `tiny` variants, shrunk further; they check the plumbing
(checkpoints written, models reloadable, metrics present), not learning, which tests/test_loops.py
covers. The multi-process and GSM8K runs of the same mains are in tests/test_mains_*.py.
"""

import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from programs import run

from experiments import common
from experiments.configs import grpo as grpo_config
from experiments.configs import opd as opd_config
from experiments.configs import sft as sft_config
from jaxpost import UserError, inputs, models, tokenizers
from jaxpost.models import hf
from jaxpost.recipes import common as recipes_common
from jaxpost.recipes import grpo, opd, sft
from jaxpost.tokenizers import CharTokenizer, HFTokenizer


def _tiny(module, workdir):
    c = module.get_config("tiny")
    c.workdir = str(workdir)
    c.model_overrides = "n_layers=1"
    c.task.countdown.number_range, c.task.countdown.target_range = (1, 9), (10, 40)
    c.task.countdown.min_solutions = 2
    c.eval.prompts, c.eval.samples, c.eval.max_new_tokens = 3, 2, 16
    for stage in ("sft", "teacher_sft"):
        if stage in c:
            c[stage].data.train_problems, c[stage].loop.steps = 24, 3
    if "sampling" in c:
        c.train_problems, c.loop.steps, c.loop.batch_size = 12, 2, 2
        c.sampling.max_new_tokens = 16
    else:
        c.data.train_problems, c.loop.steps = 24, 3
    return c


def _save_bpe_tokenizer(path):
    """A small byte-level BPE over Countdown text, saved for transformers: nothing downloaded."""
    from assets import bpe_tokenizer

    from jaxpost.tasks import countdown

    task = countdown.Countdown(number_range=(1, 9), target_range=(10, 40), min_solutions=2)
    probs = task.prompts("train", 40, seed=0)
    text = [task.render_prompt(p) + task.render_completion(p, task.solutions(p)[0]) for p in probs]
    bpe_tokenizer(path, text, vocab_size=320)
    return str(path)


# ---------------------------------------------------------------------------------------------
# end to end, in process


@pytest.mark.slow
def test_sft_then_opd_and_opsd_from_its_checkpoint(tmp_path):
    # SFT with a local Hugging Face tokenizer, so --model later exercises the HF-directory path.
    c = _tiny(sft_config, tmp_path / "sft")
    c.tokenizer = _save_bpe_tokenizer(tmp_path / "tok")
    c.data.retention_share, c.eval.addition_prompts = 0.2, 2
    out = sft.run(c)
    assert set(out["results"]) == {"before", "after SFT"}
    assert set(out["results"]["after SFT"]) == {"countdown", "addition"}
    assert 0 <= out["results"]["after SFT"]["countdown"]["scalars"]["pass@1"]["mean"] <= 1
    model_dir = out["model_dir"]
    loaded = inputs.load_model(model_dir)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.config.vocab_size == loaded.tokenizer.vocab_size and loaded.config.n_layers == 1
    assert os.path.exists(tmp_path / "sft" / "metrics.jsonl")
    with open(tmp_path / "sft" / "eval.json") as f:
        assert "pass@k" in json.load(f)["results"]["before"]["countdown"]["curves"]

    o = _tiny(opd_config, tmp_path / "opd")
    o.model, o.teacher, o.alpha, o.model_overrides = model_dir, model_dir, 0.5, ""
    out = opd.run(o)
    assert set(out["results"]) == {"start", "teacher", "after OPD"}
    assert hf.load_hf(out["model_dir"])[0] == loaded.config

    o = _tiny(opd_config, tmp_path / "opd_topk")
    o.model, o.teacher, o.teacher_topk, o.model_overrides = model_dir, model_dir, 8, ""
    o.eval.prompts = 0
    opd.run(o)
    rows = [json.loads(line) for line in open(tmp_path / "opd_topk" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and all(0 < r["teacher_tail_mass"] < 1 for r in rows)
    assert abs(rows[0]["loss"]) < 1e-5  # the teacher is the student itself: D = 0 at step 1

    # two teachers (interleaved prompt shares) on their own 4 devices, scores cached
    o = _tiny(opd_config, tmp_path / "opd_served")
    o.model, o.teacher, o.teacher_topk, o.model_overrides = model_dir, f"{model_dir},{model_dir}", 8, ""
    o.teacher_devices, o.teacher_cache_rows, o.eval.prompts = 4, 256, 0
    opd.run(o)
    rows = [json.loads(line) for line in open(tmp_path / "opd_served" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and all(r["teacher_0_rows"] + r["teacher_1_rows"] == 4 for r in rows)
    assert sum(r["teacher_0_rows"] for r in rows) > 0 and sum(r["teacher_1_rows"] for r in rows) > 0
    assert all(0 <= r["teacher_cache_hit_frac"] <= 1 for r in rows)
    assert abs(rows[0]["loss"]) < 1e-5

    # across tokenizers: the built-in character-tokenizer student, the BPE teacher above
    o = _tiny(opd_config, tmp_path / "opd_cross")
    o.teacher, o.teacher_topk, o.eval.prompts = model_dir, 8, 0
    opd.run(o)
    rows = [json.loads(line) for line in open(tmp_path / "opd_cross" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and all(0 < r["aligned_frac"] <= 1 and np.isfinite(r["loss"])
                                         for r in rows)  # fmt: skip

    o = _tiny(opd_config, tmp_path / "opd_sampled")
    o.model, o.teacher, o.loss, o.sampled_with_reward, o.model_overrides = (
        model_dir, model_dir, "sampled", True, "")  # fmt: skip
    o.eval.prompts = 0
    out = opd.run(o)
    rows = [json.loads(line) for line in open(tmp_path / "opd_sampled" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and all(np.isfinite(r["sampled_reverse_kl"]) for r in rows)
    # the teacher is the student's own checkpoint: on-policy, the estimate is exactly 0
    assert all(abs(r["sampled_reverse_kl"]) < 1e-4 for r in rows[:1])

    s = _tiny(opd_config, tmp_path / "opsd")
    s.model, s.mode, s.prefix_len, s.model_overrides = model_dir, "opsd", 4, ""
    s.lora_rank = 2  # low-rank adapters on the student (jaxpost.lora)
    s.self_teacher = "live"  # the teacher is the current policy ...
    s.privileged = "feedback"  # ... seeing the verifier's message on the attempt in its prompt
    s.eval.prompts = 0  # training only
    out = opd.run(s)
    assert out["results"] == {"start": {}, "after OPSD": {}}
    assert os.path.exists(os.path.join(out["model_dir"], "tokenizer.json"))
    rows = [json.loads(line) for line in open(tmp_path / "opsd" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])


@pytest.mark.slow
def test_grpo_from_a_preset_trains_its_own_sft_start(tmp_path, capsys):
    g = _tiny(grpo_config, tmp_path / "grpo")
    g.grpo.unlikeliness_beta, g.grpo.kl_beta = 0.25, 0.04
    g.sampling.temperature, g.sampling.top_p = 0.7, 0.9  # the sampler's q differs from π_old
    # every GRPO practice on at once (jaxpost.shaping; the entropy bonus in the objective)
    g.grpo.dynamic_sampling, g.grpo.mask_truncated, g.grpo.overlong_buffer = True, True, 4
    g.grpo.entropy_top_frac, g.grpo.entropy_coef = 0.5, 0.01
    g.lora_rank = 4  # and low-rank adapters: the saved model is the merged one
    out = grpo.run(g)
    assert set(out["results"]) == {"start", "after GRPO"}
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["kl"])
    for r in rows:  # the importance correction is on by default, and logs its ratio
        assert 0 < r["is_ratio_min"] <= r["is_ratio_mean"] <= r["is_ratio_max"]
    assert any(r["is_ratio_min"] < 1 for r in rows)  # tempered and truncated: q ≠ π_old
    for key in ("ds_rounds", "ds_informative_frac", "ds_filler_groups", "truncated_frac",
                "trained_token_frac"):  # fmt: skip
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(1 <= r["ds_rounds"] <= g.grpo.max_sampling_rounds for r in rows)
    init = tmp_path / "grpo" / "sft_init" / "model"
    assert (init / "config.json").exists() and (init / tokenizers.TOKENIZER_MARKER).exists()
    assert isinstance(inputs.load_model(str(init)).tokenizer, CharTokenizer)
    assert hf.load_hf(out["model_dir"])[0] == hf.load_hf(str(init))[0]
    capsys.readouterr()  # a rerun finds the starting model and skips the SFT
    task = inputs.make_task(g.task)
    recipes_common.student(g, task, None)
    assert f"sft_init: reusing {init}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the command line


def _parse(config_name, *args):
    argv = ["prog", *args]
    fv = flags.FlagValues()  # not absl's global FLAGS: other tests may parse those
    holders = common.define_flags(config_name, flag_values=fv, sys_argv=argv)
    fv(argv)
    return holders


def test_flags_configs_variants_and_shorthands(tmp_path):
    holders = _parse("grpo", "--config=experiments/configs/grpo.py:tiny", "--config.loop.steps=7",
                     "--config.task.countdown.number_range=(1,9)", "--config.grpo.kl_beta=0.1",
                     f"--model={tmp_path}", f"--workdir={tmp_path}/w", "--task=gsm8k",
                     "--mesh=1,2,1", f"--teacher={tmp_path}/t")  # fmt: skip
    c = common.config_from_flags(holders)
    assert (c.loop.steps, c.task.countdown.number_range, c.grpo.kl_beta) == (7, (1, 9), 0.1)
    assert (c.model, c.workdir, c.task.name, c.mesh) == (str(tmp_path), f"{tmp_path}/w", "gsm8k",
                                                         "1,2,1")  # fmt: skip
    assert c.sampling.group_size == grpo_config.get_config("tiny").sampling.group_size
    holders = _parse("sft")  # no --config: the main's own default config
    assert common.config_from_flags(holders) == sft_config.get_config()
    for name in ("sft", "grpo", "opd", "paradigms"):  # every main shares the same fields
        shared = _parse(name)["config"].value
        for field in ("model", "teacher", "task", "dtype", "mesh", "loss_impl", "seed", "workdir"):
            assert field in shared, (name, field)
    with pytest.raises(ValueError, match="unknown config variant 'huge'"):
        sft_config.get_config("huge")


@pytest.mark.slow
def test_every_main_lists_its_flags_and_reports_errors_in_one_line(tmp_path):
    for main in ("sft", "grpo", "opd", "paradigms"):
        p = run(f"experiments.{main}", "--help", timeout=120)
        for flag in ("--config", "--workdir", "--model", "--teacher", "--task", "--mesh"):
            assert flag in p.stdout, (main, flag)
    missing = tmp_path / "missing"
    r = run("experiments.grpo", "--config=experiments/configs/grpo.py:tiny",
            f"--workdir={tmp_path}", f"--model={missing}")  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        f"experiments.grpo: error: model not found: '{missing}' is neither a preset "
        f"({', '.join(models.PRESETS)}) nor a directory")  # fmt: skip
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# errors, raised before anything is compiled


def test_missing_model_directory(tmp_path):
    c = _tiny(sft_config, tmp_path)
    c.model = str(tmp_path / "nope")
    with pytest.raises(UserError, match="neither a preset .* nor a directory"):
        sft.run(c)


def _saved_char_model(path, preset, vocab_size=None, marker=True, **overrides):
    tok = CharTokenizer()
    config = models.get_config(preset, vocab_size=vocab_size or tok.vocab_size, n_layers=1,
                               **overrides)  # fmt: skip
    params = jax.tree.map(lambda x: np.full(x.shape, 0.01, x.dtype), models.abstract_params(config))
    inputs.save_model(str(path), inputs.Model(config, params, tok, preset))  # no init to compile
    if not marker:
        os.remove(os.path.join(path, tokenizers.TOKENIZER_MARKER))
    return path


def test_missing_teacher(tmp_path):
    o = _tiny(opd_config, tmp_path)
    o.teacher = str(tmp_path / "no_teacher")
    o.model, o.model_overrides = str(_saved_char_model(tmp_path / "student", "tiny")), ""
    with pytest.raises(UserError, match="model not found: .*no_teacher"):
        opd.run(o)
    o.mode = "opsd"
    with pytest.raises(UserError, match="drop --teacher"):
        opd.run(o)


def test_vocabulary_mismatch_and_missing_tokenizer(tmp_path):
    small_vocab = _saved_char_model(tmp_path / "v64", "tiny", vocab_size=64)
    with pytest.raises(UserError, match="vocabulary mismatch.*99 ids.*64 rows"):
        inputs.load_model(str(small_vocab))
    bare = _saved_char_model(tmp_path / "bare", "tiny", marker=False)
    with pytest.raises(UserError, match="no tokenizer in"):
        inputs.load_model(str(bare))
    assert isinstance(inputs.load_model(str(bare), tokenizer="char").tokenizer, CharTokenizer)
    # a teacher of another vocabulary is refused before anything is trained
    o = _tiny(opd_config, tmp_path / "opd")
    wide = _saved_char_model(tmp_path / "v128", "tiny", vocab_size=128)
    o.model, o.teacher, o.model_overrides = str(bare), str(wide), ""
    o.tokenizer = "char"
    with pytest.raises(UserError, match="must share one tokenizer and vocabulary"):
        opd.run(o)


@pytest.mark.slow
def test_prompts_longer_than_the_model_accepts(tmp_path):
    c = _tiny(sft_config, tmp_path)
    c.model = str(_saved_char_model(tmp_path / "short", "tiny", max_seq_len=24))
    c.model_overrides = ""
    # the training data's memory plan comes first; the prompts would be refused as well
    with pytest.raises(UserError, match="exceeds the model's max_seq_len 24"):
        sft.run(c)
    c.eval.max_new_tokens = 30  # the held-out prompts leave no room for the answer
    with pytest.raises(UserError, match="more than the model's max_seq_len 24"):
        recipes_common.evaluate_sets("before", inputs.load_model(c.model), None,
                                     recipes_common.eval_sets(c, inputs.make_task(c.task)), c.eval,
                                     mesh=None)  # fmt: skip


def test_bad_overrides_and_settings(tmp_path):
    assert inputs.parse_overrides("d_model=96, n_layers=3,qk_norm=true,dtype=bfloat16,eos_id=2") == {
        "d_model": 96, "n_layers": 3, "qk_norm": True, "dtype": "bfloat16", "eos_id": 2}  # fmt: skip
    for bad in ("d_model", "vocab_size=5", "widths=3", "d_model=abc"):
        with pytest.raises(UserError, match="model override"):
            inputs.parse_overrides(bad)
    g = _tiny(grpo_config, tmp_path)
    g.grpo.loss_type = "ppo"
    with pytest.raises(UserError, match="loss_type must be one of"):
        grpo.run(g)
    g.grpo.loss_type, g.grpo.is_mode = "dapo", "per_token"
    with pytest.raises(UserError, match="grpo.is_mode must be one of"):
        grpo.run(g)
    g.grpo.is_mode, g.grpo.entropy_top_frac = "sequence_mask", 0.0
    with pytest.raises(UserError, match=r"grpo.entropy_top_frac must lie in \(0, 1\]"):
        grpo.run(g)
    g.grpo.entropy_top_frac, g.grpo.overlong_buffer = 1.0, 1000
    with pytest.raises(UserError, match="grpo.overlong_buffer .* must be shorter"):
        grpo.run(g)
    g.grpo.overlong_buffer, g.grpo.max_sampling_rounds = 0, 0
    with pytest.raises(UserError, match="grpo.max_sampling_rounds must be >= 1"):
        grpo.run(g)
    for fields, match in (
        (dict(teacher_topk=8, loss="entropy_aware"), "teacher_topk > 0 needs loss 'kl'"),
        (dict(self_teacher="ema"), "use --config.mode=opsd"),
        (dict(self_teacher="ema", mode="opsd", lora_rank=2),
         "self_teacher ema runs without lora_rank"),
        (dict(loss="sampled", sampled_coef=0.0), "sampled_coef must be > 0"),
        (dict(teacher_devices=2), "teacher_devices needs a top-k teacher"),
        (dict(teacher_topk=4, teacher_devices=8), r"teacher_devices must lie in \[1, 7\]"),
        (dict(privileged="feedback"), "privileged feedback is OPSD's context"),
        (dict(privileged="hint", mode="opsd"), "privileged must be one of"),
    ):  # fmt: skip
        o = _tiny(opd_config, tmp_path)
        o.update(fields)
        with pytest.raises(UserError, match=match):
            opd.run(o)
    o = _tiny(opd_config, tmp_path)
    o.alpha = 1.5
    with pytest.raises(UserError, match=r"alpha must lie in \[0, 1\]"):
        opd.run(o)
    o.alpha, o.loss_impl = 1.0, "cuda"
    with pytest.raises(UserError, match="unknown loss_impl 'cuda'"):
        opd.run(o)
    c = _tiny(sft_config, tmp_path)
    c.workdir = ""
    with pytest.raises(UserError, match="a workdir is needed"):
        sft.run(c)
    c = _tiny(sft_config, tmp_path / "w")
    c.task.name = "math"
    with pytest.raises(UserError, match="unknown task 'math'"):
        sft.run(c)
    c.task.name, c.mesh = "countdown", "4,4,4"
    with pytest.raises(UserError, match="mesh '4,4,4' on 8 devices"):
        sft.run(c)
    c.task.name, c.mesh = "gsm8k", ""
    with pytest.raises(UserError, match="task gsm8k needs exactly one of"):
        sft.run(c)


def test_a_workdir_resumes_only_the_run_it_holds(tmp_path):
    c = _tiny(sft_config, tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("")  # a log teed there first is not a run
    recipes_common.require_workdir(c)
    c.loop.steps = 5  # nothing trained yet: a corrected rerun is fine
    recipes_common.require_workdir(c)
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # the run has started
    c.eval.samples, c.loop.progress = 8, True  # evaluation and reporting may change
    recipes_common.require_workdir(c)
    c.loop.steps, c.optim.learning_rate = 6, 1e-3
    with pytest.raises(UserError, match=r"other settings \(loop.steps: 5 -> 6; optim.learning_rate"):
        recipes_common.require_workdir(c)
