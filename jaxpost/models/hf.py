"""Hugging Face checkpoint import/export (Llama, Qwen2, Qwen3), local safetensors only.

`load_hf(path)` reads `config.json` and `model.safetensors` (or the shards named by
`model.safetensors.index.json`) from a local directory; `save_hf(path, config, params)` writes a
directory that `transformers.AutoModelForCausalLM.from_pretrained` loads. Nothing here touches the
network. Pickled `.bin` weights are refused: unpickling runs arbitrary code.

Weight layout: transformers stores a Linear as [out, in]; jaxpost stores [in, out] with heads
split out, e.g. q_proj.weight [H·E, D] <-> attn.q [D, H, E], and stacks the blocks along a
leading layer axis: model.layers.{i}.self_attn.q_proj.weight <-> layers.attn.q[i] [n, D, H, E].
Loading stacks the per-layer tensors; saving slices them apart again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost.models.configs import DTYPES, ModelConfig
from jaxpost.models.functional import abstract_params

# config.json <-> ModelConfig lives beside; re-exported so `hf.config_from_hf` etc. keep working.
from jaxpost.models.hf_config import (  # noqa: F401
    ARCHITECTURES,
    CheckpointError,
    config_from_hf,
    config_to_hf,
)

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------------
# weight names and layouts

# jaxpost path inside a layer -> (HF name inside the layer, to_hf, from_hf given the config)
_T = lambda w: w.T  # noqa: E731


def _layer_map(c: ModelConfig) -> dict[tuple[str, ...], tuple[str, Callable, Callable]]:
    D, H, K, E = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    m = {
        ("attn", "q"): ("self_attn.q_proj.weight", lambda w: w.reshape(D, H * E).T,
                        lambda w: w.T.reshape(D, H, E)),
        ("attn", "k"): ("self_attn.k_proj.weight", lambda w: w.reshape(D, K * E).T,
                        lambda w: w.T.reshape(D, K, E)),
        ("attn", "v"): ("self_attn.v_proj.weight", lambda w: w.reshape(D, K * E).T,
                        lambda w: w.T.reshape(D, K, E)),
        ("attn", "o"): ("self_attn.o_proj.weight", lambda w: w.reshape(H * E, D).T,
                        lambda w: w.T.reshape(H, E, D)),
        ("mlp", "gate"): ("mlp.gate_proj.weight", _T, _T),
        ("mlp", "up"): ("mlp.up_proj.weight", _T, _T),
        ("mlp", "down"): ("mlp.down_proj.weight", _T, _T),
        ("attn_norm", "scale"): ("input_layernorm.weight", None, None),
        ("mlp_norm", "scale"): ("post_attention_layernorm.weight", None, None),
    }  # fmt: skip
    if c.qkv_bias:
        m[("attn", "q_bias")] = ("self_attn.q_proj.bias", lambda b: b.reshape(H * E),
                                 lambda b: b.reshape(H, E))  # fmt: skip
        m[("attn", "k_bias")] = ("self_attn.k_proj.bias", lambda b: b.reshape(K * E),
                                 lambda b: b.reshape(K, E))  # fmt: skip
        m[("attn", "v_bias")] = ("self_attn.v_proj.bias", lambda b: b.reshape(K * E),
                                 lambda b: b.reshape(K, E))  # fmt: skip
    if c.qk_norm:
        m[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight", None, None)
        m[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight", None, None)
    return m


def _name_map(c: ModelConfig) -> dict[tuple, tuple[str, Callable | None, Callable | None]]:
    """Every jaxpost parameter path outside the blocks -> (HF tensor name, to_hf, from_hf)."""
    names = {
        ("embed",): ("model.embed_tokens.weight", None, None),
        ("final_norm", "scale"): ("model.norm.weight", None, None),
    }
    if not c.tie_embeddings:
        names[("lm_head",)] = ("lm_head.weight", _T, _T)
    return names


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------
# reading


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"shards named in {index} are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, _SINGLE)
    if os.path.exists(single):
        return [single]
    others = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(path, f) for f in others]
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickled PyTorch weights ({', '.join(pickles)}); jaxpost refuses "
            "pickles because loading them runs arbitrary code. Convert to safetensors first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, "
            "safe_serialization=True)` in a trusted environment."
        )
    raise CheckpointError(f"no model weights (model.safetensors or {_INDEX}) found in {path}")


def read_config(path: str, dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` of a local Hugging Face model directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"missing config.json in {path}")
    with open(cfg_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno}); "
                                  f"the file is truncated or corrupt: copy or save the "
                                  f"checkpoint again") from None  # fmt: skip
    return config_from_hf(raw, dtype)


def load_hf(path: str, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Load a local Hugging Face checkpoint as `(config, params)`.

    Args:
      path: a directory with `config.json` and safetensors weights (single file or sharded with
        `model.safetensors.index.json`). Nothing is downloaded.
      dtype: parameter and compute dtype ("float32", "bfloat16"); None keeps the stored dtype
        of the weights (a bfloat16 checkpoint loads as bfloat16).

    Raises:
      CheckpointError: missing config or weights, an unsupported architecture, pickled weights,
        missing or unexpected tensors, or tensor shapes that disagree with the config.
    """
    from safetensors import safe_open

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    config = read_config(path)
    tensors, origin = {}, {}
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    tensors[name], origin[name] = f.get_tensor(name), file
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise CheckpointError(f"cannot read {file} ({type(e).__name__}: {e}); the file is "
                                  f"truncated or corrupt: copy or save the checkpoint "
                                  f"again") from None  # fmt: skip

    stored = {str(t.dtype) for n, t in tensors.items() if n.endswith("embed_tokens.weight")}
    stored_dtype = stored.pop() if stored else "float32"
    if dtype is None:
        dtype = stored_dtype if stored_dtype in DTYPES else "float32"
    config = config.replace(dtype=dtype, param_dtype=dtype)

    expected = abstract_params(config)

    def take(hf_name: str, from_hf, want: tuple) -> np.ndarray:
        if hf_name not in tensors:
            raise CheckpointError(f"tensor {hf_name} is missing from the checkpoint in {path}")
        value = tensors.pop(hf_name)
        stored_shape = tuple(value.shape)
        try:
            value = from_hf(value) if from_hf is not None else value
            ok = tuple(value.shape) == want
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(
                f"tensor {hf_name} has shape {stored_shape}, which disagrees with config.json "
                f"(jaxpost expects {want} after re-layout)"
            )
        bad = int(value.size - jnp.isfinite(value).sum())
        if bad:
            raise CheckpointError(f"tensor {hf_name} in {origin[hf_name]} holds {bad} NaN or "
                                  f"infinite values; the checkpoint is corrupt or was saved from "
                                  f"a diverged run: use an earlier one")  # fmt: skip
        return value

    params: dict = {}
    for path_, (hf_name, _, from_hf) in _name_map(config).items():
        want = tuple(_get_path(expected, path_).shape)
        _set_path(params, path_, jnp.asarray(take(hf_name, from_hf, want), DTYPES[dtype]))
    for path_, (hf_name, _, from_hf) in _layer_map(config).items():
        want = tuple(_get_path(expected, ("layers", *path_)).shape[1:])
        per_layer = [
            take(f"model.layers.{i}.{hf_name}", from_hf, want) for i in range(config.n_layers)
        ]
        stacked = jnp.stack([jnp.asarray(w, DTYPES[dtype]) for w in per_layer])
        _set_path(params, ("layers", *path_), stacked)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exporters write the tied head anyway
    leftover = [n for n in tensors if not n.endswith(_IGNORED_SUFFIXES)]
    if leftover:
        raise CheckpointError(
            f"unexpected tensors in {path} that the config does not account for: {leftover[:8]}"
        )
    return config, params


# ---------------------------------------------------------------------------------------------
# writing


def save_hf(
    path: str,
    config: ModelConfig,
    params,
    *,
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write `params` as a Hugging Face checkpoint directory (safetensors, sharded if large).

    The directory is assembled in a temporary sibling and moved into place at the end, so an
    interrupted save never leaves a half-written checkpoint. Non-finite parameters are refused.
    `tokenizer`, if given, is saved beside the weights with `save_pretrained`.
    """
    from safetensors.numpy import save_file

    expected = abstract_params(config)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    want = jax.tree.map(lambda x: tuple(x.shape), expected)
    if got != want:
        raise ValueError("params do not match the config's parameter shapes; cannot export")
    tensors: dict[str, np.ndarray] = {}

    def put(hf_name: str, path_: tuple, value, to_hf) -> None:
        if not bool(jnp.all(jnp.isfinite(value))):
            raise ValueError(
                f"parameter {'/'.join(map(str, path_))} holds NaN or inf; refusing to save"
            )
        value = to_hf(value) if to_hf is not None else value
        # numpy has no bfloat16; ml_dtypes (a jax dependency) provides it and safetensors maps it.
        tensors[hf_name] = np.ascontiguousarray(
            np.asarray(value.astype(DTYPES[config.param_dtype]))
        )

    for path_, (hf_name, to_hf, _) in _name_map(config).items():
        put(hf_name, path_, jnp.asarray(_get_path(params, path_)), to_hf)
    for i in range(config.n_layers):
        for path_, (hf_name, to_hf, _) in _layer_map(config).items():
            stacked = _get_path(params, ("layers", *path_))
            put(
                f"model.layers.{i}.{hf_name}", ("layers", i, *path_), jnp.asarray(stacked[i]), to_hf
            )

    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_save_hf_", dir=parent)
    try:
        shards = _split_shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, _SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(t.nbytes for t in tensors.values())
            with open(os.path.join(tmp, _INDEX), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2
                )
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(config), f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700: readable by the group, as a
        if os.path.exists(path):  # directory made any other way would be
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _split_shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards
