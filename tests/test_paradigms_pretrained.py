"""The head-to-head from Hugging Face checkpoints (--model / --teacher) on GSM8K and Countdown,
sharded over a mesh with the fused OPD loss (the Pallas GPU kernel, interpreted on CPU, run
per device inside shard_map), and the errors a user gets for bad scale settings.

Everything is built here: a byte-level BPE tokenizer, tiny random Qwen2 checkpoints (a student
and a differently shaped teacher; one family, because transformers picks the tokenizer class by
model type, so a Llama beside a Qwen2 would tokenize the same files differently, which the
tokenizer check rightly refuses) saved with transformers, and GSM8K-format JSONL.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxpost import data, paradigms

pytest.importorskip("transformers")


def _gsm8k_records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b, c = (int(x) for x in rng.integers(2, 30, 3))
        out.append({
            "question": f"Tom has {a} apples and buys {b} bags of {c}. How many apples now?",
            "answer": f"The bags hold {b}*{c} = <<{b}*{c}={b * c}>>{b * c} apples.\n"
                      f"So {a}+{b * c} = <<{a}+{b * c}={a + b * c}>>{a + b * c}.\n"
                      f"#### {a + b * c}",
        })  # fmt: skip
    return out


def _tokenizer(path, corpus: list[str]):
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    bpe = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip
    tok.save_pretrained(str(path))
    return tok


def _checkpoint(path, tok, family: str, seed: int, **overrides):
    from hf_models import build_torch_model

    model = build_torch_model(family, seed=seed, vocab_size=len(tok),
                              max_position_embeddings=256, **overrides)  # fmt: skip
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    train, test = _gsm8k_records(40, 0), _gsm8k_records(12, 1)
    gsm = root / "gsm8k"
    gsm.mkdir()
    data.write_jsonl(str(gsm / "train.jsonl"), train)
    data.write_jsonl(str(gsm / "test.jsonl"), test)
    corpus = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in train]
    corpus += [f"{a}+{b}={a + b}" for a in range(10, 99, 7) for b in range(10, 99, 11)]
    tok = _tokenizer(root / "tok", corpus)
    student = _checkpoint(root / "student", tok, "qwen2", seed=0)
    teacher = _checkpoint(root / "teacher", tok, "qwen2", seed=1, num_hidden_layers=1,
                          hidden_size=48, intermediate_size=64)  # fmt: skip
    return {"root": root, "gsm8k": str(gsm), "student": student, "teacher": teacher}


def _mini(workdir, **overrides):
    return paradigms.miniature(str(workdir), max_new_tokens=24, **overrides)


@pytest.mark.slow
def test_gsm8k_from_checkpoints_on_a_mesh_with_the_fused_loss(assets, tmp_path):
    s = _mini(tmp_path / "run", task="gsm8k", gsm8k_dir=assets["gsm8k"], model=assets["student"],
              teacher=assets["teacher"], mesh="2,2,2", loss_impl="pallas_gpu",
              arms=("sft", "grpo", "opd_rkl", "opsd"))  # fmt: skip
    assert s.base_steps == 0 and s.arm_lr == paradigms.PRETRAINED_DEFAULTS["arm_lr"]
    lines = []
    result = paradigms.run(s, log=lines.append)
    assert list(result["arms"]) == ["base", "teacher", "sft", "grpo", "opd_rkl", "opsd"]
    assert "steerability" not in result["radar_axes"] and len(result["radar_axes"]) == 5
    settings = result["settings"]
    assert assets["student"] in settings["student"] and assets["teacher"] in settings["teacher"]
    assert settings["task"].startswith("GSM8K") and "mesh 2,2,2" in settings["devices"]
    for name, arm in result["arms"].items():
        sc = arm["scalars"]
        assert "steerability" not in sc
        for key in ("pass@1", "pass@large_k", "retention", "cot_pass@1"):
            assert np.isfinite(sc[key]["mean"]), (name, key)
        assert "diversity" in sc  # NaN while no sample is right (random weights)
        if arm["kind"] == "arm":
            assert np.isfinite(sc["kl_from_base"]["mean"]) and sc["kl_from_base"]["mean"] != 0
            assert np.isfinite(sc["efficiency"]["mean"])
            assert arm["history"][-1]["step"] == s.arm_steps
    # the base is the student checkpoint as it is; nothing was pretrained or cached for it
    assert not any("base (SFT" in line for line in lines)
    assert not os.path.exists(os.path.join(s.workdir, "models", s.model_key(), "base"))
    for name in ("report.md", "metrics.json", "pass_at_k.png", "cot_pass_at_k.png", "radar.png"):
        assert os.path.getsize(os.path.join(s.workdir, name)) > 0, name
    with open(os.path.join(s.workdir, "metrics.json")) as f:
        assert json.load(f)["settings"]["task"] == settings["task"]


@pytest.mark.slow
def test_countdown_from_a_checkpoint_trains_its_teacher_and_caches_it(assets, tmp_path):
    s = _mini(tmp_path / "run", model=assets["student"], teacher_steps=2, arms=("opd_rkl",))
    lines = []
    first = paradigms.run(s, log=lines.append)
    teacher_dir = os.path.join(s.workdir, "models", s.model_key(), "teacher")
    assert os.path.exists(os.path.join(teacher_dir, "config.json"))
    assert os.path.exists(os.path.join(teacher_dir, "tokenizer.json"))  # reloadable on its own
    assert "steerability" in first["radar_axes"]
    again = []
    second = paradigms.run(s, log=again.append)
    assert any(f"reusing {teacher_dir}" in line for line in again)
    assert second["arms"]["opd_rkl"]["scalars"]["pass@1"] == first["arms"]["opd_rkl"]["scalars"][
        "pass@1"]  # fmt: skip


def test_bad_scale_settings_name_the_problem(assets, tmp_path):
    w = str(tmp_path)
    with pytest.raises(ValueError, match="gsm8k needs a pretrained --model"):
        paradigms.Settings(workdir=w, task="gsm8k", gsm8k_dir=assets["gsm8k"])
    with pytest.raises(ValueError, match="exactly one of gsm8k_dir"):
        paradigms.Settings(workdir=w, task="gsm8k", model=assets["student"])
    with pytest.raises(ValueError, match="GSM8K file not found"):
        paradigms.Settings(workdir=w, task="gsm8k", model=assets["student"], gsm8k_dir=w)
    with pytest.raises(ValueError, match="unknown task"):
        paradigms.Settings(workdir=w, task="math")
    with pytest.raises(ValueError, match="model directory not found"):
        paradigms.Settings(workdir=w, model=os.path.join(w, "missing"))
    with pytest.raises(ValueError, match="teacher directory not found"):
        paradigms.Settings(workdir=w, teacher=w)
    with pytest.raises(ValueError, match="unknown dtype 'bf16'"):
        paradigms.Settings(workdir=w, model=assets["student"], dtype="bf16")
    with pytest.raises(ValueError, match="unknown loss_impl"):
        paradigms.Settings(workdir=w, loss_impl="cuda")
    with pytest.raises(ValueError, match="mesh"):
        paradigms.Settings(workdir=w, mesh="2,2,2,2")
    with pytest.raises(ValueError, match="base_steps must be >= 1"):
        paradigms.Settings(workdir=w, base_steps=0)
    # a teacher whose vocabulary differs from the student's
    other = _tokenizer(tmp_path / "tok2", ["completely different text 123"] * 4)
    odd = _checkpoint(tmp_path / "odd", other, "qwen2", seed=3)
    with pytest.raises(paradigms.InputError, match="must share one tokenizer and vocabulary"):
        paradigms.run(_mini(tmp_path / "a", model=assets["student"], teacher=odd))
    # prompts plus completions longer than the model's context
    with pytest.raises(paradigms.InputError, match="max_seq_len 256"):
        paradigms.run(paradigms.miniature(str(tmp_path / "b"), task="gsm8k",
                                          gsm8k_dir=assets["gsm8k"], model=assets["student"],
                                          teacher=assets["teacher"], max_new_tokens=250))  # fmt: skip


def test_inputs_found_bad_at_run_time_are_input_errors(assets, tmp_path):
    bare = tmp_path / "bare"  # a checkpoint directory without its tokenizer
    bare.mkdir()
    shutil.copy(os.path.join(assets["student"], "config.json"), bare / "config.json")
    with pytest.raises(paradigms.InputError, match=f"tokenizer of {bare}"):
        paradigms.run(_mini(tmp_path / "a", model=str(bare)))
    with pytest.raises(paradigms.InputError, match="mesh '4,4,4' on 8 devices"):
        paradigms.run(paradigms.miniature(str(tmp_path / "b"), mesh="4,4,4"))


def test_a_multi_process_job_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(paradigms.jax, "process_count", lambda: 4)
    with pytest.raises(paradigms.InputError, match="runs in one process.*4 processes"):
        paradigms.run(paradigms.miniature(str(tmp_path)))
    assert not os.path.exists(tmp_path / "models")


def test_the_program_reports_bad_inputs_in_one_line(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.paradigms", f"--workdir={tmp_path / 'w'}",
         f"--model={bare}", "--mini"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"experiments.paradigms: error: tokenizer of {bare}"), lines
    assert "Traceback" not in proc.stderr


def test_a_checkpoint_rewritten_in_place_is_not_served_from_the_cache(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    s = paradigms.Settings(workdir=str(tmp_path / "w"), model=str(ckpt), teacher=str(ckpt))
    keys = (s.model_key(), s.arm_key())
    os.utime(ckpt / "model.safetensors", ns=(1, 1))  # touched (or copied): contents unchanged
    assert (s.model_key(), s.arm_key()) == keys
    (ckpt / "model.safetensors").write_bytes(b"Weights")  # rewritten in place, same size
    assert s.model_key() != keys[0] and s.arm_key() != keys[1]
    # the built-in protocol's keys do not depend on any file
    builtin = paradigms.Settings(workdir=str(tmp_path / "w"))
    assert builtin.model_key() == paradigms.Settings(workdir="elsewhere").model_key()
