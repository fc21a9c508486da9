"""Tokenizers: a fixed character vocabulary for the built-in tasks, and a local Hugging Face adapter.

Both follow one small interface, so task text reaches a tiny model and a real checkpoint the
same way:

    tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size
    tok.encode(text, add_bos=False, add_eos=False) -> list[int]
    tok.decode(ids, stop_at_eos=True) -> str

The character vocabulary is a constant of this module, never derived from data, so a checkpoint
trained today decodes the same tomorrow: ids 0, 1, 2 are pad, bos and eos, then newline, then the
95 printable ASCII characters in code-point order (vocab_size 99).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Printable ASCII (space .. '~') in code-point order; string.printable is not ordered that way.
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, sampler and evaluation need from a tokenizer."""

    pad_id: int
    bos_id: int | None
    eos_id: int
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str: ...


class CharTokenizer:
    """One id per character over a fixed alphabet: pad=0, bos=1, eos=2, then `CHARACTERS`.

    Characters outside the alphabet raise ValueError in `encode` (silently mapping them would let
    a task change its text without anyone noticing); `covers(text)` checks first.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = 3 + len(CHARACTERS)

    def __init__(self) -> None:
        self._id_of = {c: i + 3 for i, c in enumerate(CHARACTERS)}

    def covers(self, text: str) -> bool:
        """Whether every character of `text` is in the vocabulary."""
        return all(c in self._id_of for c in text)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos / eos."""
        try:
            ids = [self._id_of[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the character vocabulary"
            ) from None
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """Text of `ids`; pad and bos are dropped, and eos ends the text when `stop_at_eos`.

        Ids outside the vocabulary decode to nothing, so a sampled sequence always decodes.
        """
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if 3 <= i < self.vocab_size:
                out.append(CHARACTERS[i - 3])
        return "".join(out)


class HFTokenizer:
    """The same interface over a Hugging Face tokenizer saved in a local directory.

    Loaded with `local_files_only=True`: nothing is ever downloaded. Tokenizers without a pad
    token (common for decoder-only checkpoints) pad with eos; `bos_id` is None when the tokenizer
    has no bos token (Qwen2), and `add_bos` then adds nothing.
    """

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        if hf_tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; generation could not stop")
        self.eos_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = hf_tokenizer.bos_token_id
        self.bos_id = int(bos) if bos is not None else None
        self.vocab_size = len(hf_tokenizer)
        self._special = {int(i) for i in hf_tokenizer.all_special_ids}

    @classmethod
    def from_dir(cls, path: str) -> HFTokenizer:
        """Load the tokenizer files in `path` (tokenizer.json and its config)."""
        import transformers

        return cls(transformers.AutoTokenizer.from_pretrained(path, local_files_only=True))

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text` without the tokenizer's own template, optionally framed."""
        ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
        head = [self.bos_id] if add_bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        """Text of `ids` with special tokens dropped; eos ends the text when `stop_at_eos`."""
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i not in self._special and 0 <= i < self.vocab_size:
                kept.append(i)
        return self.hf.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# A jaxpost-trained model with the character tokenizer says so in this file of its directory.
TOKENIZER_MARKER = "jaxpost_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def from_model_dir(model_dir: str) -> Tokenizer:
    """The tokenizer saved beside a checkpoint: its Hugging Face files, or the character
    tokenizer when jaxpost's marker (`save_marker`) says so. Raises ValueError if there is none."""
    if any(os.path.exists(os.path.join(model_dir, f)) for f in HF_TOKENIZER_FILES):
        return HFTokenizer.from_dir(model_dir)
    marker = os.path.join(model_dir, TOKENIZER_MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            kind = json.load(f).get("kind")
        if kind == "char":
            return CharTokenizer()
        raise ValueError(f"{marker} names an unknown tokenizer kind {kind!r}")
    raise ValueError(
        f"no tokenizer in {model_dir} (no tokenizer.json / tokenizer_config.json and no "
        f"{TOKENIZER_MARKER})"
    )


def save_beside(model_dir: str, tok: Tokenizer) -> None:
    """Save `tok` into a checkpoint directory so `from_model_dir` finds it again."""
    if isinstance(tok, HFTokenizer):
        tok.hf.save_pretrained(model_dir)
    elif isinstance(tok, CharTokenizer):
        with open(os.path.join(model_dir, TOKENIZER_MARKER), "w") as f:
            json.dump({"kind": "char", "vocab_size": tok.vocab_size}, f)
    else:
        raise ValueError(f"cannot save a tokenizer of type {type(tok).__name__}")


def train_bpe(path: str, corpus: Iterable[str], vocab_size: int = 384) -> HFTokenizer:
    """A byte-level BPE trained on `corpus` here (the `tokenizers` package transformers brings;
    nothing downloaded), saved for transformers at `path`: a second tokenizer for tests and
    demos (a teacher of another vocabulary, `jaxpost.cross_tokenizer`)."""
    import transformers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    bpe = RawTokenizer(tok_models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>",
                                               bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")  # fmt: skip
    tok.save_pretrained(str(path))
    return HFTokenizer(tok)


def load_tokenizer(spec: str) -> Tokenizer:
    """ "char" for the character tokenizer, otherwise a local Hugging Face tokenizer directory."""
    return CharTokenizer() if spec == "char" else HFTokenizer.from_dir(spec)
