"""Hugging Face parity: logits of checkpoints loaded with load_hf equal transformers' own."""

import json
import os

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import models
from jaxpost.models import hf

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.mark.parametrize("case", sorted(hf_models.CASES))
def test_load_hf_logits_match_transformers(case, hf_root):
    path, torch_model = hf_models.save_case(case, hf_root, seed=3)
    config, params = hf.load_hf(path)
    family, overrides = hf_models.CASES[case]
    assert config.family == family
    assert config.tie_embeddings == overrides["tie_word_embeddings"]
    if "rope_parameters" in overrides:
        assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    if "head_dim" in overrides:
        assert config.head_dim == overrides["head_dim"] != config.d_model // config.n_heads

    tokens, mask = hf_models.random_right_padded(np.random.default_rng(1), config.vocab_size, 5, 17)
    want = hf_models.torch_logits(torch_model, tokens, mask)
    got = np.asarray(models.apply(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
    real = mask == 1
    assert got.shape == want.shape
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_save_hf_round_trip_through_transformers(family, tmp_path):
    config = models.get_config(
        "tiny", family=family, qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        tie_embeddings=family != "llama", vocab_size=61, eos_id=2, bos_id=1,
    )  # fmt: skip
    params = models.init(config, seed=7)
    # Non-trivial norms and biases so a dropped tensor shows up in the logits.
    params = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
    hf.save_hf(str(tmp_path / "out"), config, params)
    torch_model = hf_models.load_torch(str(tmp_path / "out"))
    tokens, mask = hf_models.random_right_padded(np.random.default_rng(2), 61, 3, 11)
    want = hf_models.torch_logits(torch_model, tokens, mask)
    got = np.asarray(models.apply(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=TOL, rtol=0)

    config2, params2 = hf.load_hf(str(tmp_path / "out"))
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_safetensors_save_and_load(tmp_path):
    config = models.get_config("tiny", family="llama", qkv_bias=False, tie_embeddings=False)
    params = models.init(config, seed=1)
    out = str(tmp_path / "sharded")
    hf.save_hf(out, config, params, max_shard_bytes=40_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    _, loaded = hf.load_hf(out)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    # transformers reads the same sharded directory.
    torch_model = hf_models.load_torch(out)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 9))
    np.testing.assert_allclose(
        np.asarray(models.apply(config, params, jnp.asarray(tokens))),
        hf_models.torch_logits(torch_model, tokens), atol=TOL, rtol=0,
    )  # fmt: skip


def test_bfloat16_checkpoint_loads_as_bfloat16_unless_asked(tmp_path):
    path, _ = hf_models.save_case("qwen2_tied", tmp_path, dtype="bfloat16")
    config, params = hf.load_hf(path)
    assert config.param_dtype == "bfloat16" and config.dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    config32, params32 = hf.load_hf(path, dtype="float32")
    assert config32.param_dtype == "float32"
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params32))
    logits = models.apply(config, params, jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_tokenizer_in_model_directory_loads_locally(tmp_path):
    import transformers
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefgh")}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = models.get_config("tiny", vocab_size=len(vocab))
    hf.save_hf(str(tmp_path / "m"), config, models.init(config), tokenizer=fast)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"), local_files_only=True)
    assert loaded("abc")["input_ids"][-3:] == [3, 4, 5]


# ------------------------------------------------------------------------------ bad input


def _write_case(tmp_path):
    path, _ = hf_models.save_case("qwen2_tied", tmp_path)
    return path


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(hf.CheckpointError, match="model directory not found"):
        hf.load_hf(str(tmp_path / "nope"))
    path = _write_case(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="no model weights"):
        hf.load_hf(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(hf.CheckpointError, match="missing config.json"):
        hf.load_hf(path)


def test_pickled_bin_weights_are_refused(tmp_path):
    path = _write_case(tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"not really a pickle")
    with pytest.raises(
        hf.CheckpointError, match="pickled.*convert to safetensors|Convert to safetensors"
    ):
        hf.load_hf(path)


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_unsupported_architecture(tmp_path):
    path = _write_case(tmp_path)
    _edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(hf.CheckpointError, match="unsupported architecture.*gpt2"):
        hf.load_hf(path)


def test_weight_shapes_disagreeing_with_config(tmp_path):
    path = _write_case(tmp_path)
    _edit_config(path, intermediate_size=64)
    with pytest.raises(hf.CheckpointError, match=r"mlp\.gate_proj\.weight has shape"):
        hf.load_hf(path)


def test_missing_and_unexpected_tensors(tmp_path):
    path = _write_case(tmp_path)
    _edit_config(path, num_hidden_layers=3)
    with pytest.raises(hf.CheckpointError, match="model.layers.2.* is missing"):
        hf.load_hf(path)
    _edit_config(path, num_hidden_layers=1)
    with pytest.raises(hf.CheckpointError, match="unexpected tensors"):
        hf.load_hf(path)


def test_token_ids_outside_vocabulary(tmp_path):
    config, params = hf.load_hf(_write_case(tmp_path))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        models.apply(config, params, jnp.array([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token ids"):
        models.apply(config, params, jnp.array([[-1, 2]]))


def test_save_refuses_non_finite_and_leaves_nothing(tmp_path):
    config = models.get_config("tiny")
    params = models.init(config)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN or inf"):
        hf.save_hf(str(tmp_path / "bad"), config, params)
    assert not os.path.exists(tmp_path / "bad")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_save_hf_")]
