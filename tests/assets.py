"""Inputs a user would bring, built locally: a byte-level BPE tokenizer, tiny random Hugging Face
checkpoints saved with transformers, and GSM8K-format JSONL. Nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np


def gsm8k_records(n: int, seed: int) -> list[dict]:
    """GSM8K-format records ({"question", "answer": rationale + "#### <number>"})."""
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


def write_gsm8k(directory, train: int = 40, test: int = 12) -> str:
    """train.jsonl and test.jsonl in `directory`; returns its path."""
    from jaxpost import data

    os.makedirs(directory, exist_ok=True)
    data.write_jsonl(os.path.join(directory, "train.jsonl"), gsm8k_records(train, 0))
    data.write_jsonl(os.path.join(directory, "test.jsonl"), gsm8k_records(test, 1))
    return str(directory)


def bpe_tokenizer(path, corpus: list[str], vocab_size: int = 384):
    """A byte-level BPE trained on `corpus`, saved for transformers at `path` (its HF object)."""
    from jaxpost.tokenizers import train_bpe

    return train_bpe(str(path), corpus, vocab_size).hf


def gsm8k_corpus() -> list[str]:
    """GSM8K-like and addition text: what the test tokenizer is trained on."""
    train = gsm8k_records(40, 0)
    corpus = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in train]
    return corpus + [f"{a}+{b}={a + b}" for a in range(10, 99, 7) for b in range(10, 99, 11)]


def checkpoint(path, tok, family: str = "qwen2", seed: int = 0, **overrides) -> str:
    """A tiny random checkpoint of `family` with `tok`'s vocabulary, tokenizer beside it."""
    from hf_models import build_torch_model

    model = build_torch_model(family, seed=seed, vocab_size=len(tok),
                              max_position_embeddings=256, **overrides)  # fmt: skip
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


def gsm8k_assets(root) -> dict:
    """A GSM8K directory, a tokenizer, a tiny Qwen2 student and a differently shaped Qwen2
    teacher (one family: transformers picks the tokenizer class by model type)."""
    gsm = write_gsm8k(os.path.join(str(root), "gsm8k"))
    tok = bpe_tokenizer(os.path.join(str(root), "tok"), gsm8k_corpus())
    student = checkpoint(os.path.join(str(root), "student"), tok, seed=0)
    teacher = checkpoint(os.path.join(str(root), "teacher"), tok, seed=1, num_hidden_layers=1,
                         hidden_size=48, intermediate_size=64)  # fmt: skip
    return {"root": str(root), "gsm8k": gsm, "student": student, "teacher": teacher}
