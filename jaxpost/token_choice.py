"""How the sampler picks each token: temperature, top-k, top-p (nucleus), and the logprobs
that come back with the token (under the untempered policy, and under the distribution actually
sampled from). `Static` holds the hashable settings that shape the compiled program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpost.models import ModelConfig


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything that shapes the compiled program (hashable, a jit static argument)."""

    config: ModelConfig
    greedy: bool
    top_k: int | None
    use_top_p: bool
    with_entropy: bool
    stop_ids: tuple[int, ...]
    pad_id: int


def truncate(scaled_NxV, s: Static, top_p):
    """Logits of the sampling distribution: top-k then top-p (nucleus) truncation, -inf outside.

    Top-p keeps the smallest set of most likely tokens whose probability reaches p: a token is kept
    when the mass strictly before it (in descending order) is below p, so the top token always is.
    """
    neg_inf = jnp.float32(-jnp.inf)
    if s.top_k is not None and s.top_k < scaled_NxV.shape[-1]:
        kth = jax.lax.top_k(scaled_NxV, s.top_k)[0][:, -1:]
        scaled_NxV = jnp.where(scaled_NxV >= kth, scaled_NxV, neg_inf)
    if s.use_top_p:
        order = jnp.argsort(-scaled_NxV, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled_NxV, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[jnp.arange(order.shape[0])[:, None], order]
            .set(keep_sorted)
        )
        scaled_NxV = jnp.where(keep, scaled_NxV, neg_inf)
    return scaled_NxV


def choose(logits_NxV, keys_N, s: Static, temperature, top_p):
    """Pick one token per row; return it with its policy logprob, sampling logprob, entropy."""
    logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
    if s.greedy:
        token = jnp.argmax(logits_NxV, axis=-1)
        sample_lp = jnp.zeros(token.shape, jnp.float32)
    else:
        sampling = truncate(logits_NxV / temperature, s, top_p)
        token = jax.vmap(jax.random.categorical)(keys_N, sampling)
        sample_lp = jnp.take_along_axis(
            jax.nn.log_softmax(sampling, axis=-1), token[:, None], axis=-1
        )[:, 0]
    policy_lp = jnp.take_along_axis(logp_NxV, token[:, None], axis=-1)[:, 0]
    entropy = None
    if s.with_entropy:
        p = jnp.exp(logp_NxV)
        entropy = -jnp.sum(jnp.where(p > 0, p * logp_NxV, 0.0), axis=-1)
    return token.astype(jnp.int32), policy_lp, sample_lp, entropy
