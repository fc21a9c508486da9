"""The experiment mains: miniature runs end to end, and clear errors for bad flags and inputs.

The end-to-end tests shrink every knob (tiny preset, a few steps, a few prompts); they check the
plumbing (checkpoints written, models reloadable, metrics present), not learning, which
tests/test_loops.py covers.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from experiments import common, grpo, opd, sft
from experiments.configs import grpo as grpo_config
from experiments.configs import opd as opd_config
from experiments.configs import sft as sft_config
from jaxpost import models
from jaxpost.models import hf
from jaxpost.tokenizers import CharTokenizer, HFTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shrink_stage(c):
    c.model = "tiny"
    c.model_overrides = "n_layers=1"
    c.data.train_problems = 24
    c.data.per_problem = 1
    c.loop.steps = 3
    c.loop.batch_size = 8
    c.loop.checkpoint_every = 0
    c.loop.progress = False
    c.optim.warmup_steps = 1


def _shrink(c, workdir):
    c.workdir = str(workdir)
    c.task.number_range = (1, 9)
    c.task.target_range = (10, 40)
    c.task.min_solutions = 2
    c.eval.prompts = 3
    c.eval.samples = 2
    c.eval.max_new_tokens = 16
    if "loop" in c and "group_size" in c.loop:  # the on-policy mains
        c.train_problems = 12
        c.loop.steps = 2
        c.loop.batch_size = 2
        c.loop.group_size = 2
        c.loop.max_new_tokens = 16
        c.loop.checkpoint_every = 0
        c.loop.progress = False
        for stage in ("sft", "teacher_sft"):
            if stage in c:
                _shrink_stage(c[stage])
    else:
        _shrink_stage(c)
    return c


def _save_bpe_tokenizer(path):
    """A small byte-level BPE over Countdown text, saved for transformers: nothing downloaded."""
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    from jaxpost.tasks import countdown

    task = countdown.Countdown(number_range=(1, 9), target_range=(10, 40), min_solutions=2)
    probs = task.prompts("train", 40, seed=0)
    text = [task.render_prompt(p) + task.render_completion(p, task.solutions(p)[0]) for p in probs]
    bpe = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    ).save_pretrained(str(path))  # fmt: skip
    return str(path)


# ---------------------------------------------------------------------------------------------
# end to end, in process


@pytest.mark.slow
def test_sft_then_opd_and_opsd_from_its_checkpoint(tmp_path):
    # SFT with a local Hugging Face tokenizer, so --init later exercises the HF-directory path.
    tok_dir = _save_bpe_tokenizer(tmp_path / "tok")
    c = _shrink(sft_config.get_config(), tmp_path / "sft")
    c.tokenizer = tok_dir
    c.data.addition_problems = 4
    c.eval.addition_prompts = 2
    out = sft.run(c)
    assert set(out["results"]) == {"before", "after SFT"}
    assert set(out["results"]["after SFT"]) == {"countdown", "addition"}
    assert 0 <= common.scalars(out, "after SFT")["pass@1"] <= 1
    model_dir = out["model_dir"]
    loaded = common.load_model(model_dir)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.config.vocab_size == loaded.tokenizer.vocab_size and loaded.config.n_layers == 1
    assert os.path.exists(tmp_path / "sft" / "metrics.jsonl")
    with open(tmp_path / "sft" / "eval.json") as f:
        assert "pass@k" in json.load(f)["results"]["before"]["countdown"]["curves"]

    o = _shrink(opd_config.get_config(), tmp_path / "opd")
    o.init, o.teacher, o.alpha = model_dir, model_dir, 0.5
    out = opd.run(o)
    assert set(out["results"]) == {"start", "teacher", "after OPD"}
    assert hf.load_hf(out["model_dir"])[0] == loaded.config

    s = _shrink(opd_config.get_config(), tmp_path / "opsd")
    s.init, s.mode, s.prefix_len = model_dir, "opsd", 4
    s.eval.prompts = 0  # training only
    out = opd.run(s)
    assert out["results"] == {"start": {}, "teacher (privileged)": {}, "after OPSD": {}}
    assert os.path.exists(os.path.join(out["model_dir"], "tokenizer.json"))
    rows = [json.loads(line) for line in open(tmp_path / "opsd" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"])


@pytest.mark.slow
def test_grpo_without_init_trains_its_own_sft_start(tmp_path, capsys):
    g = _shrink(grpo_config.get_config(), tmp_path / "grpo")
    g.grpo.unlikeliness_beta = 0.25
    g.grpo.kl_beta = 0.04
    out = grpo.run(g)
    assert set(out["results"]) == {"start", "after GRPO"}
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["kl"])
    init = tmp_path / "grpo" / "sft_init" / "model"
    assert os.path.exists(init / "config.json") and os.path.exists(init / common.TOKENIZER_MARKER)
    assert isinstance(common.load_model(str(init)).tokenizer, CharTokenizer)
    assert hf.load_hf(out["model_dir"])[0] == hf.load_hf(str(init))[0]
    capsys.readouterr()  # a rerun finds the starting model and skips the SFT
    task = common.countdown_task(g.task)
    assert sft.build_init(g.sft, task, str(init.parent), seed=0, what="init") == str(init)
    assert f"init: reusing {init}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# the command line


def _cli(*args, timeout=300):
    env = {**os.environ, "NO_GCE_CHECK": "true", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _parse(plain, *args):
    argv = ["prog", *args]
    fv = flags.FlagValues()  # not absl's global FLAGS: other tests may parse those
    holders = common.define_flags(plain, flag_values=fv, sys_argv=argv)
    fv(argv)
    return holders


def test_flags_and_config_overrides(tmp_path):
    holders = _parse(grpo.PLAIN_FLAGS, "--config=experiments/configs/grpo.py",
                     "--config.loop.steps=7", "--config.task.number_range=(1,9)",
                     "--config.grpo.kl_beta=0.1", f"--model={tmp_path}", f"--workdir={tmp_path}/w")  # fmt: skip
    c = common.config_from_flags(holders, grpo_config.get_config, grpo.PLAIN_FLAGS)
    assert (c.loop.steps, c.task.number_range, c.grpo.kl_beta) == (7, (1, 9), 0.1)
    assert (c.init, c.workdir) == (str(tmp_path), f"{tmp_path}/w")
    holders = _parse(sft.PLAIN_FLAGS)  # no --config: the main's default config
    assert common.config_from_flags(holders, sft_config.get_config, sft.PLAIN_FLAGS) == (
        sft_config.get_config()
    )
    with pytest.raises(flags.UnrecognizedFlagError, match="teacher"):
        _parse(sft.PLAIN_FLAGS, f"--teacher={tmp_path}")  # sft has no teacher


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    missing = tmp_path / "missing"
    r = _cli("experiments.grpo", "--config=experiments/configs/grpo.py",
             f"--workdir={tmp_path}", f"--init={missing}")  # fmt: skip
    assert r.returncode == 1
    assert f"experiments.grpo: error: --init directory not found: {missing}" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# errors, raised before anything is compiled


def test_missing_model_directory(tmp_path):
    c = _shrink(sft_config.get_config(), tmp_path)
    c.model = str(tmp_path / "nope")
    with pytest.raises(common.ExperimentError, match="neither a preset .* nor a directory"):
        sft.run(c)


def test_missing_teacher(tmp_path):
    o = _shrink(opd_config.get_config(), tmp_path)
    o.teacher = str(tmp_path / "no_teacher")
    o.init = str(_saved_char_model(tmp_path / "student", "tiny"))
    with pytest.raises(common.ExperimentError, match="--teacher directory not found"):
        opd.run(o)
    o.mode = "opsd"
    with pytest.raises(common.ExperimentError, match="drop --teacher"):
        opd.run(o)


def _saved_char_model(path, preset, vocab_size=None, marker=True, **overrides):
    tok = CharTokenizer()
    config = models.get_config(preset, vocab_size=vocab_size or tok.vocab_size, n_layers=1,
                               **overrides)  # fmt: skip
    params = jax.tree.map(lambda x: np.full(x.shape, 0.01, x.dtype), models.abstract_params(config))
    model = common.Model(config, params, tok, preset)  # constant weights: no init to compile
    common.save_model(str(path), model, model.params)
    if not marker:
        os.remove(os.path.join(path, common.TOKENIZER_MARKER))
    return path


def test_vocabulary_mismatch_and_missing_tokenizer(tmp_path):
    small_vocab = _saved_char_model(tmp_path / "v64", "tiny", vocab_size=64)
    with pytest.raises(common.ExperimentError, match="vocabulary mismatch.*99 ids.*64 rows"):
        common.load_model(str(small_vocab))
    bare = _saved_char_model(tmp_path / "bare", "tiny", marker=False)
    with pytest.raises(common.ExperimentError, match="no tokenizer in"):
        common.load_model(str(bare))
    assert isinstance(common.load_model(str(bare), tokenizer="char").tokenizer, CharTokenizer)


def test_prompts_longer_than_the_model_accepts(tmp_path):
    c = _shrink(sft_config.get_config(), tmp_path)
    c.model = str(_saved_char_model(tmp_path / "short", "tiny", max_seq_len=24))
    c.model_overrides = ""
    with pytest.raises(common.ExperimentError, match="more than the model's max_seq_len 24"):
        sft.run(c)


def test_bad_overrides_and_settings(tmp_path):
    assert common.parse_overrides("d_model=96, n_layers=3,qk_norm=true,dtype=bfloat16,eos_id=2") == {
        "d_model": 96, "n_layers": 3, "qk_norm": True, "dtype": "bfloat16", "eos_id": 2}  # fmt: skip
    for bad in ("d_model", "vocab_size=5", "widths=3", "d_model=abc"):
        with pytest.raises(common.ExperimentError, match="model override"):
            common.parse_overrides(bad)
    g = _shrink(grpo_config.get_config(), tmp_path)
    g.grpo.loss_type = "ppo"
    with pytest.raises(common.ExperimentError, match="loss_type must be one of"):
        grpo.run(g)
    o = _shrink(opd_config.get_config(), tmp_path)
    o.alpha = 1.5
    with pytest.raises(common.ExperimentError, match=r"alpha must lie in \[0, 1\]"):
        opd.run(o)
    c = _shrink(sft_config.get_config(), tmp_path)
    c.workdir = ""
    with pytest.raises(common.ExperimentError, match="a workdir is needed"):
        sft.run(c)


def test_a_workdir_resumes_only_the_run_it_holds(tmp_path):
    c = _shrink(sft_config.get_config(), tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("")  # a log teed there first is not a run
    common.require_workdir(c)
    c.loop.steps = 5  # nothing trained yet: a corrected rerun is fine
    common.require_workdir(c)
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # the run has started
    c.eval.samples, c.loop.progress = 8, True  # evaluation and reporting may change
    common.require_workdir(c)
    c.loop.steps, c.optim.learning_rate = 6, 1e-3
    with pytest.raises(common.ExperimentError,
                       match=r"other settings \(loop.steps: 5 -> 6; optim.learning_rate"):  # fmt: skip
        common.require_workdir(c)
