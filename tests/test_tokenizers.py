"""Character tokenizer and the local Hugging Face adapter share one interface."""

import pytest

from jaxpost import tokenizers
from jaxpost.tasks import countdown as cd

TEXTS = ["3 5 7 -> 22:", "3*5=15,7+15=22;7+(3*5)", "ref 4+7\n4 7 9 -> 11:"]


def test_char_vocab_is_fixed():
    tok = tokenizers.CharTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 99)
    # Pinned ids: changing the alphabet would silently break saved checkpoints.
    assert tok.encode("\n ") == [3, 4]
    assert tok.encode("0") == [4 + ord("0") - 32]
    assert tok.encode("~") == [98]


def test_char_round_trip_and_framing():
    tok = tokenizers.CharTokenizer()
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == len(text) + 2
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("12", add_eos=True) + tok.encode("34")) == "12"
    assert (
        tok.decode(tok.encode("12", add_eos=True) + tok.encode("34"), stop_at_eos=False) == "1234"
    )
    assert tok.decode([0, 0, 500, -1] + tok.encode("ab")) == "ab"  # never raises on model output
    assert not tok.covers("é") and tok.covers(TEXTS[1])
    with pytest.raises(ValueError, match="not in the character vocabulary"):
        tok.encode("é")


def _save_local_hf_tokenizer(path):
    """Train a tiny BPE on task text, wrap it for transformers, save it: nothing downloaded."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    task = cd.Countdown()
    corpus = [task.render_prompt(p) for p in task.prompts("train", 50, seed=0)] + TEXTS
    bpe.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(path))


def test_hf_adapter_loads_locally_and_round_trips(tmp_path):
    pytest.importorskip("transformers")
    _save_local_hf_tokenizer(tmp_path / "tok")
    tok = tokenizers.load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(tok, tokenizers.HFTokenizer) and isinstance(tok, tokenizers.Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and len(ids) < len(text) + 2  # merges happened
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("3 5", add_eos=True) + tok.encode("7")) == "3 5"


def test_load_tokenizer_char_and_missing_dir(tmp_path):
    assert isinstance(tokenizers.load_tokenizer("char"), tokenizers.CharTokenizer)
    with pytest.raises(OSError):
        tokenizers.load_tokenizer(str(tmp_path / "missing"))


def test_the_tokenizer_saved_beside_a_checkpoint_is_found_again(tmp_path):
    pytest.importorskip("transformers")
    char_dir, hf_dir, bare = tmp_path / "char", tmp_path / "hf", tmp_path / "bare"
    for d in (char_dir, hf_dir, bare):
        d.mkdir()
    tokenizers.save_beside(str(char_dir), tokenizers.CharTokenizer())
    assert isinstance(tokenizers.from_model_dir(str(char_dir)), tokenizers.CharTokenizer)
    _save_local_hf_tokenizer(tmp_path / "tok")
    tokenizers.save_beside(str(hf_dir), tokenizers.load_tokenizer(str(tmp_path / "tok")))
    again = tokenizers.from_model_dir(str(hf_dir))
    assert isinstance(again, tokenizers.HFTokenizer) and again.encode(TEXTS[0]) == (
        tokenizers.load_tokenizer(str(tmp_path / "tok")).encode(TEXTS[0]))  # fmt: skip
    with pytest.raises(ValueError, match="no tokenizer in"):
        tokenizers.from_model_dir(str(bare))
    (bare / tokenizers.TOKENIZER_MARKER).write_text('{"kind": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizers.from_model_dir(str(bare))
