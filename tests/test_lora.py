"""LoRA (jaxpost.lora): the merge against the float64 formula W + (alpha/r)·A B on every target's
shape, gradients by the chain rule, a run that trains only the adapters, and the acceptance: the
exported Hugging Face checkpoint's logits (transformers) equal the merged model's."""

import dataclasses

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import inputs, loops, lora, models, train
from jaxpost.models import hf
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size, eos_id=TOK.eos_id)


def _random_adapters(params, cfg, seed=1):
    adapters = lora.init(params, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), adapters)


def test_init_is_the_base_and_merge_is_the_formula():
    params = models.init(CONFIG, seed=0)
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q", "o", "down"))
    start = lora.merge(params, lora.init(params, cfg), cfg)
    jax.tree.map(np.testing.assert_array_equal, start, params)
    adapters = _random_adapters(params, cfg)
    merged = lora.merge(params, adapters, cfg)
    for (group, name) in lora.TARGETS:
        w = np.asarray(params["layers"][group][name], np.float64)
        got = np.asarray(merged["layers"][group][name], np.float64)
        if name not in cfg.targets:
            np.testing.assert_array_equal(got, w)
            continue
        a = np.asarray(adapters[group][name]["a"], np.float64)
        b = np.asarray(adapters[group][name]["b"], np.float64)
        for layer in range(w.shape[0]):
            delta = (a[layer] @ b[layer]).reshape(w.shape[1:])
            np.testing.assert_allclose(got[layer], w[layer] + 2.0 * delta, atol=1e-6)
    assert lora.count(adapters) == sum(
        w.shape[0] * 3 * sum(lora._matrix(w.shape, n_in))
        for (g, n), n_in in lora.TARGETS.items() if n in cfg.targets
        for w in [params["layers"][g][n]])  # fmt: skip


def test_adapter_gradient_is_the_chain_rule():
    params = models.init(CONFIG, seed=0)
    cfg = lora.LoraConfig(rank=2, alpha=4.0)
    adapters = _random_adapters(params, cfg, seed=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, TOK.vocab_size, (2, 9)))
    mask = jnp.ones_like(tokens)

    def loss(p):
        return models.apply(CONFIG, p, tokens, mask).astype(jnp.float32).std()

    g_adapters = jax.grad(lambda a: loss(lora.merge(params, a, cfg)))(adapters)
    g_w = jax.grad(loss)(lora.merge(params, adapters, cfg))
    for (group, name), n_in in lora.TARGETS.items():
        gw = np.asarray(g_w["layers"][group][name], np.float64)
        gw = gw.reshape(gw.shape[0], *lora._matrix(gw.shape, n_in))
        a = np.asarray(adapters[group][name]["a"], np.float64)
        b = np.asarray(adapters[group][name]["b"], np.float64)
        want_a = cfg.scale * np.einsum("lio,lro->lir", gw, b)
        want_b = cfg.scale * np.einsum("lir,lio->lro", a, gw)
        got = g_adapters[group][name]
        np.testing.assert_allclose(np.asarray(got["a"]), want_a, atol=1e-5 * np.abs(want_a).max())
        np.testing.assert_allclose(np.asarray(got["b"]), want_b, atol=1e-5 * np.abs(want_b).max())


def test_bad_settings_are_refused():
    for bad in (dict(rank=0), dict(rank=2, alpha=0.0), dict(rank=2, targets=("qkv",)),
                dict(rank=2, targets=())):  # fmt: skip
        with pytest.raises(ValueError):
            lora.LoraConfig(**bad)


@pytest.mark.slow
def test_sft_trains_only_adapters_and_the_export_matches_transformers(tmp_path):
    # A random init's tied embeddings (std 0.02) bound its logits after the fixed final norm,
    # and adapters cannot rescale them: a larger table makes the frozen head expressive, as a
    # pretrained one is (here LoRA then keeps pace with full fine-tuning: 1.99 vs 1.94 at step 30).
    params = models.init(CONFIG, seed=0)
    params = {**params, "embed": params["embed"] * 20}
    pairs = [(TOK.encode(f"{i}+{i}=", add_bos=True), TOK.encode(str(2 * i), add_eos=True))
             for i in range(32)]  # fmt: skip
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    optim = train.OptimConfig(learning_rate=3e-2, warmup_steps=0, total_steps=30)
    loop = loops.LoopConfig(steps=30, batch_size=8, progress=False,
                            workdir=str(tmp_path / "run"), checkpoint_every=15)  # fmt: skip
    result = loops.run_sft(CONFIG, params, pairs, optim, loop, lora=cfg)
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]
    # the state (and so the checkpoint) holds the adapters; the model is base + adapters
    assert set(result.state.params) == {"attn", "mlp"}
    assert lora.count(result.state.params) < 0.5 * sum(x.size for x in jax.tree.leaves(params))
    merged = lora.merge(params, result.state.params, cfg)
    jax.tree.map(np.testing.assert_array_equal, result.params, merged)
    assert float(jnp.abs(result.state.params["attn"]["q"]["b"]).max()) > 0
    # rerun: resumes from the adapters' checkpoint, nothing left to do
    again = loops.run_sft(CONFIG, params, pairs, optim, loop, lora=cfg)
    jax.tree.map(np.testing.assert_array_equal, again.params, result.params)

    model = inputs.Model(CONFIG, merged, TOK, source="test")
    out = inputs.save_model(str(tmp_path / "export"), model)
    torch_model = hf_models.load_torch(out)
    tokens, mask = hf_models.random_right_padded(np.random.default_rng(2), TOK.vocab_size, 3, 11)
    want = hf_models.torch_logits(torch_model, tokens, mask)
    got = np.asarray(models.apply(CONFIG, merged, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=0)
    loaded = hf.load_hf(out)[1]
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, merged))


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["sft", "grpo"])
def test_lora_on_a_mesh_matches_one_device(paradigm):
    """Adapters replicated over an FSDP x tensor x data mesh of 8 devices, the frozen base
    sharded: the same losses and merged model as on one device."""
    from jaxpost import sharding

    params = models.init(CONFIG, seed=0)
    params = {**params, "embed": params["embed"] * 20}
    cfg = lora.LoraConfig(rank=4, alpha=8.0)
    optim = train.OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=3, eps=1e-2)
    loop = loops.LoopConfig(steps=3, batch_size=8, seed=2, progress=False)
    prompts = [TOK.encode(f"{i}+{i}=", add_bos=True) for i in range(16)]

    def run(mesh):
        if paradigm == "sft":
            pairs = [(p, TOK.encode(str(2 * i), add_eos=True)) for i, p in enumerate(prompts)]
            return loops.run_sft(CONFIG, params, pairs, optim, loop, lora=cfg, mesh=mesh)
        source = loops.PromptSource(prompts, reward=lambda i, c: float(TOK.decode(c) == str(2 * i)),
                                    eos_id=TOK.eos_id, pad_id=TOK.pad_id)  # fmt: skip
        return loops.run_grpo(CONFIG, params, source, optim, dataclasses.replace(loop, batch_size=4),
                              loops.SamplingConfig(group_size=2, max_new_tokens=6), lora=cfg,
                              mesh=mesh)  # fmt: skip

    one, sharded = run(None), run(sharding.make_mesh((2, 2, 2)))
    for a, b in zip(one.history, sharded.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 one.params, jax.device_get(sharded.params))  # fmt: skip
