"""Low-rank adapters (LoRA, Hu et al., 2021) on the student's projections, for every main.

A target projection W (one per layer, stored stacked [L, ...]) is read as a matrix [in, out]:
q, k, v, gate and up take the model width D in (out = the rest of its shape flattened); o takes
its heads H·E in; down takes F in. Its adapter is A [L, in, r] and B [L, r, out], and the model
runs with

    W' = W + (alpha / r) · A B        (reshaped to W's shape)

A starts Gaussian with std 1/√in and B at zero, so W' = W at step 0. Training holds only the
adapters (their gradients and optimizer moments: for AdamW 3 × the adapter size instead of
3 × the model's); the frozen base is an input of the step (sharded like any frozen model) and
`merge` forms W' inside the step, differentiably in A and B. Checkpoints hold the adapters; the
model a main saves is the merged one (`merge`), a plain Hugging Face checkpoint.

Own reading, not a copy of any library: the functional merge trades one transient W'-sized
copy per target (and W's gradient, formed in the backward and contracted to A's and B's) for a
forward that is the unmodified model, so every objective, loss path and sampler works as is.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# (group, name) -> how many leading dims (after the layer axis) are the projection's input
TARGETS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
           ("mlp", "gate"): 1, ("mlp", "up"): 1, ("mlp", "down"): 1}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r ≥ 1, alpha (the update is scaled by alpha / r), and the target projections
    (names of TARGETS' second field: "q", "k", "v", "o", "gate", "up", "down")."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha}")
        known = {name for _, name in TARGETS}
        unknown = sorted(set(self.targets) - known)
        if unknown or not self.targets:
            raise ValueError(f"unknown lora targets {unknown}; choose from {sorted(known)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def from_rank(rank: int, alpha: float) -> LoraConfig | None:
    """A config's `lora_rank` / `lora_alpha` fields as a LoraConfig; None at rank 0 (full
    training). ValueError for a bad rank or alpha."""
    return LoraConfig(rank=rank, alpha=float(alpha)) if rank else None


def _targets(config: LoraConfig):
    return [(g, n, k) for (g, n), k in TARGETS.items() if n in config.targets]


def _matrix(shape, n_in: int) -> tuple[int, int]:
    """(in, out) of a stacked projection [L, *in_dims, *out_dims]."""
    return math.prod(shape[1 : 1 + n_in]), math.prod(shape[1 + n_in :])


def init(params, config: LoraConfig, seed: int = 0) -> dict:
    """The adapters {group: {name: {"a": [L, in, r], "b": [L, r, out]}}} of `params`' target
    projections, in their dtype: A ~ N(0, 1/in), B = 0 (so the merged model is `params`)."""
    out: dict = {}
    key = jax.random.PRNGKey(seed)
    for i, (group, name, n_in) in enumerate(_targets(config)):
        w = params["layers"][group][name]
        d_in, d_out = _matrix(w.shape, n_in)
        a = jax.random.normal(jax.random.fold_in(key, i), (w.shape[0], d_in, config.rank))
        out.setdefault(group, {})[name] = {
            "a": (a / np.sqrt(d_in)).astype(w.dtype),
            "b": jnp.zeros((w.shape[0], config.rank, d_out), w.dtype),
        }
    return out


def abstract(abstract_params, config: LoraConfig) -> dict:
    """`init`'s shapes and dtypes from abstract parameters (the memory planner's)."""
    return jax.eval_shape(lambda p: init(p, config), abstract_params)


def merge(params, adapters, config: LoraConfig):
    """`params` with each target W replaced by W + scale · A B (module docstring); the other
    leaves are the same arrays. Differentiable in `adapters` (and `params`)."""
    layers = {g: dict(v) for g, v in params["layers"].items()}
    for group, name, _ in _targets(config):
        w = layers[group][name]
        ab = adapters[group][name]
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32),
                           ab["b"].astype(jnp.float32))  # fmt: skip
        layers[group][name] = (w.astype(jnp.float32) + config.scale * delta.reshape(w.shape)
                               ).astype(w.dtype)  # fmt: skip
    return {**params, "layers": layers}


def count(adapters) -> int:
    """Trainable adapter parameters."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapters))


def wrap_objective(objective, config: LoraConfig):
    """`(adapters, batch, base_params, *frozen) -> objective(merge(base, adapters), batch,
    *frozen)`: the step trains the adapters, the base is a frozen input."""

    def adapted(adapters, batch, base, *frozen):
        return objective(merge(base, adapters, config), batch, *frozen)

    return adapted


__all__ = ["TARGETS", "LoraConfig", "abstract", "count", "from_rank", "init", "merge",
           "wrap_objective"]
