"""Decoder-only transformers (Llama-3, Qwen2/2.5, Qwen3) as pure functions of parameter dicts.

    config = jaxpost.models.get_config("tiny")
    params = jaxpost.models.init(config, seed=0)
    logits_BxLxV = jaxpost.models.apply(config, params, tokens_BxL, attention_mask_BxL)

Hugging Face checkpoints: `jaxpost.models.hf.load_hf(path)` / `save_hf(path, config, params)`.
"""

from jaxpost.models.configs import PRESETS, ModelConfig, RopeScaling, get_config
from jaxpost.models.functional import (
    KVCache,
    abstract_params,
    apply,
    cache_shapes,
    check_tokens,
    forward_cached,
    grow_cache,
    head_weight,
    hidden_states,
    init,
    init_cache,
    layer_params,
    logical_axes,
    positions_from_mask,
)
from jaxpost.models.transformer import LOGICAL_AXES, Transformer

__all__ = [
    "LOGICAL_AXES",
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "abstract_params",
    "apply",
    "cache_shapes",
    "check_tokens",
    "forward_cached",
    "get_config",
    "grow_cache",
    "head_weight",
    "hidden_states",
    "init",
    "init_cache",
    "layer_params",
    "logical_axes",
    "positions_from_mask",
]
