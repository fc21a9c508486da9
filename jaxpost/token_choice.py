"""How the sampler picks each token: temperature, top-k, top-p (nucleus), and the logprobs
that come back with the token (under the untempered policy, and under the distribution actually
sampled from). `Static` holds the hashable settings that shape the compiled program.

A `Guide` turns on Q♯'s value-guided decoding (`jaxpost.qsharp`): the token is drawn from
π(a|s) ∝ π_ref(a|s)·exp(Q(s, a)) on the base's top-k tokens, each candidate scored by a value
model with its own KV cache (`choose_guided`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxpost import models
from jaxpost.models import KVCache, ModelConfig
from jaxpost.models import functional as model_functions


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

    Top-p keeps a token when the mass of the tokens strictly more likely than it is below p, so
    the top token always is: the smallest set of most likely tokens whose probability reaches p,
    with tokens of equal probability kept or dropped together (a sort would keep the first of
    them by index). No sort of the vocabulary: `nucleus_floor` finds the least kept probability.
    """
    neg_inf = jnp.float32(-jnp.inf)
    if s.top_k is not None and s.top_k < scaled_NxV.shape[-1]:
        kth = jax.lax.top_k(scaled_NxV, s.top_k)[0][:, -1:]
        scaled_NxV = jnp.where(scaled_NxV >= kth, scaled_NxV, neg_inf)
    if s.use_top_p:
        probs = jax.nn.softmax(scaled_NxV, axis=-1)
        keep = probs >= nucleus_floor(probs, top_p)[:, None]
        scaled_NxV = jnp.where(keep, scaled_NxV, neg_inf)
    return scaled_NxV


def nucleus_floor(probs_NxV, top_p):
    """Per row, the least probability x whose mass above, Σ_j p_j·[p_j > x], is below `top_p`:
    top-p keeps exactly the tokens with p >= x.

    The mass above x only falls as x grows, and non-negative float32s order as their bit
    patterns, so a bisection over the bits finds x exactly in 31 passes over the row (each a
    compare and a sum), where a sort of a V-token row costs V·log V comparisons run one by one
    on XLA:CPU: at 16 rows of 4096 tokens the truncation took 0.42 ms against the sort's 10.1,
    and generation at top-p 0.9 ran 5747 tokens/s against 1291 (AMD EPYC Zen 5 2-core CPU,
    2026-12-05; benchmarks/paradigms_budget.md)."""
    top_p = jnp.asarray(top_p, jnp.float32)

    def mass_above_is_small(x_bits):  # [N] int32 -> [N] bool
        x = jax.lax.bitcast_convert_type(x_bits, jnp.float32)[:, None]
        return jnp.sum(jnp.where(probs_NxV > x, probs_NxV, 0.0), axis=-1) < top_p

    def halve(_, lo_hi):  # invariant: hi holds; lo fails, or is -1 (below 0.0)
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        open_ = hi - lo > 1  # converged rows stay put
        ok = mass_above_is_small(mid)
        return jnp.where(open_ & ~ok, mid, lo), jnp.where(open_ & ok, mid, hi)

    # no mass lies above the largest probability: its bits hold
    hi = jax.lax.bitcast_convert_type(jnp.max(probs_NxV, axis=-1), jnp.int32)
    lo = jnp.full_like(hi, -1)
    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))  # bits(1.0) < 2^30: 31 halvings suffice
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def first_argmax(x_NxV):
    """jnp.argmax over the last axis (the first index among equal maxima; the first NaN if any),
    as two reductions that vectorize: the row's max, then the least index that attains it.
    XLA:CPU runs jnp.argmax's (value, index) reduce one element at a time: at 16 rows of 4096
    logits it took 136 µs a call, this 29 (AMD EPYC Zen 5 2-core CPU, 2026-12-06)."""
    row_max = jnp.max(x_NxV, axis=-1, keepdims=True)
    hit = (x_NxV == row_max) | jnp.isnan(x_NxV)
    V = x_NxV.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def token_logprob(logits_NxV, token_N):
    """log_softmax(logits)[token] per row, without the [N, V] log-probabilities: the shifted
    logit minus log Σ exp(shifted), jax.nn.log_softmax's arithmetic at one index."""
    shifted = logits_NxV - jax.lax.stop_gradient(jnp.max(logits_NxV, axis=-1, keepdims=True))
    log_sum = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    return jnp.take_along_axis(shifted, token_N[:, None], axis=-1)[:, 0] - log_sum


def categorical(keys_N, logits_NxV):
    """One draw per row, the very tokens of jax.vmap(jax.random.categorical)(keys, logits):
    argmax(logits + Gumbel noise of the row's key), by `first_argmax`."""
    V = logits_NxV.shape[-1]
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (V,), logits_NxV.dtype))(keys_N)
    return first_argmax(noise + logits_NxV)


def choose(logits_NxV, keys_N, s: Static, temperature, top_p):
    """Pick one token per row; return it with its policy logprob, sampling logprob, entropy."""
    if s.greedy:
        token = first_argmax(logits_NxV)
        sample_lp = jnp.zeros(token.shape, jnp.float32)
    else:
        sampling = truncate(logits_NxV / temperature, s, top_p)
        token = categorical(keys_N, sampling)
        sample_lp = token_logprob(sampling, token)
    policy_lp = token_logprob(logits_NxV, token)
    entropy = None
    if s.with_entropy:
        logp_NxV = jax.nn.log_softmax(logits_NxV, axis=-1)
        p = jnp.exp(logp_NxV)
        entropy = -jnp.sum(jnp.where(p > 0, p * logp_NxV, 0.0), axis=-1)
    return token.astype(jnp.int32), policy_lp, sample_lp, entropy


# ---------------------------------------------------------------------------------------------
# Q♯ guidance: candidates scored by a value model (jaxpost.qsharp)


@struct.dataclass
class Guide:
    """Q♯-guided sampling: π(a|s) ∝ π_ref(a|s)·exp(Q(s, a)) on π_ref's `top_k` next tokens,
    Q(s, a) = log(1 − p + p·e^η), p = σ(value logit of s + a) (`jaxpost.qsharp`).

    Attributes:
      config: the value model's transformer (static; its vocabulary must be the policy's).
      params: the value tree {"model": transformer params, "head": {"w": [D], "b": []}}.
      top_k: candidates scored per step (static).
      eta: η, the inverse KL strength (0: Q ≡ 0, the base truncated to its top-k).
    """

    config: ModelConfig = struct.field(pytree_node=False)
    params: Any
    top_k: int = struct.field(pytree_node=False, default=20)
    eta: float = 10.0

    def check(self, config: ModelConfig, top_k, top_p) -> None:
        if self.config.vocab_size != config.vocab_size:
            raise ValueError(f"the guide's value model reads the policy's tokens: vocabularies "
                             f"{self.config.vocab_size} and {config.vocab_size} "
                             f"differ")  # fmt: skip
        if self.top_k < 1 or top_k is not None or (top_p is not None and top_p < 1):
            raise ValueError("a guide samples from its own top_k (>= 1) candidates: pass neither "
                             "top_k nor top_p with it")  # fmt: skip


def q_from_logits(x, eta):
    """Q = log(1 − p + p·e^η) of p = σ(x), stably: log1p(p·expm1(η)) up to η = 20 (exactly 0 at
    η = 0 or p = 0, so a zero guide leaves the base's logits bit for bit), and beyond it
    logaddexp(log σ(−x), η + log σ(x)), which never forms e^η."""
    x = jnp.asarray(x, jnp.result_type(x, jnp.float32))
    eta = jnp.asarray(eta, x.dtype)
    small = jnp.log1p(jax.nn.sigmoid(x) * jnp.expm1(jnp.minimum(eta, 20.0)))
    large = jnp.logaddexp(jax.nn.log_sigmoid(-x), eta + jax.nn.log_sigmoid(x))
    return jnp.where(eta <= 20.0, small, large)


def value_head(hidden_BxTxD, head) -> jax.Array:
    """The value logit [B, T] of each hidden state: h·w + b, in float32."""
    w = head["w"].astype(jnp.float32)
    return jnp.einsum("btd,d->bt", hidden_BxTxD.astype(jnp.float32), w) + head["b"]


def scratch_cache(config: ModelConfig, batch: int, capacity: int) -> KVCache:
    """An empty cache of `capacity` slots, which may pass max_seq_len: the slots after the real
    sequence hold candidate tokens, whose positions (what rope sees) stay within it."""
    return model_functions.empty_cache(config, batch, capacity, config.compute_dtype)


def candidate_values(config: ModelConfig, value_params, tokens_BxC, positions_BxC, sees_BxCxS,
                     cache: KVCache, scratch: int, layers=None
                     ) -> tuple[jax.Array, KVCache]:  # fmt: skip
    """Value logits [B, C] of C candidate tokens, each read as if it alone followed the cached
    slots it sees: the candidates are C query tokens written at slots [scratch, scratch + C) of
    `cache`; candidate c attends the slots `sees_BxCxS` marks (never a scratch slot) and its own,
    not the other candidates. Also returns the cache with the candidates' keys and values in the
    scratch slots (their valid bits unset)."""
    C = tokens_BxC.shape[1]
    own_CxS = jnp.arange(cache.capacity)[None, :] == scratch + jnp.arange(C)[:, None]
    # The model itself, not forward_cached: its causal mask would let candidates see each other.
    model = model_functions._model(config, value_params["model"])
    hidden, kv = model.hidden(tokens_BxC, positions_BxC, sees_BxCxS | own_CxS[None],
                              list(zip(cache.k, cache.v)), scratch, layers)  # fmt: skip
    cache = cache.replace(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv))
    return value_head(hidden, value_params["head"]), cache


def guide_prefill(guide: Guide, prompt_NxP, positions_NxP, prompt_mask_NxP, real_slots: int):
    """The value model's cache after the prompt ([real slots + top_k scratch slots]) and its
    per-layer weights (sliced once on CPU, as the sampler does for the policy)."""
    c = guide.config
    k = min(guide.top_k, c.vocab_size)
    cpu = jax.default_backend() == "cpu"
    layers = models.layer_params(c, guide.params["model"]) if cpu else None
    cache = scratch_cache(c, prompt_NxP.shape[0], real_slots + k)
    _, cache = models.forward_cached(c, guide.params["model"], prompt_NxP, positions_NxP,
                                     prompt_mask_NxP, cache, 0, last_only=True,
                                     layers=layers)  # fmt: skip
    return cache, layers


def choose_guided(logits_NxV, keys_N, s: Static, temperature, guide: Guide, cache: KVCache,
                  layers, positions_N, slot, live_N):  # fmt: skip
    """`choose` under a guide: the base's top-k tokens scored by the value model at `slot`
    (position `positions_N`), the token drawn from the full-vocabulary logits
    (base logits / temperature) + Q on the top-k, −inf elsewhere, by the plain path's very
    categorical call (Q ≡ 0 draws the plain sampler's tokens at top_k = k). Logprobs: under the
    untempered guided policy (base logits + Q on the top-k) and under the tempered one sampled;
    entropy of the untempered one. The chosen candidate's keys and values move from its scratch
    slot to `slot` (the numbers a one-token forward of it would write: same token, position and
    attended slots), so the value cache needs no second pass. Returns the token, the logprobs,
    the entropy and the cache."""
    N, V = logits_NxV.shape
    k = min(guide.top_k, V)
    scratch = cache.capacity - k
    base_k, idx = jax.lax.top_k(logits_NxV, k)
    sees = jnp.broadcast_to(cache.valid_BxS[:, None, :], (N, k, cache.capacity))
    positions = jnp.broadcast_to(positions_N[:, None], (N, k))
    x, cache = candidate_values(guide.config, guide.params, idx, positions, sees, cache, scratch,
                                layers)  # fmt: skip
    q = q_from_logits(x, guide.eta)
    policy_k = jax.nn.log_softmax(base_k + q, axis=-1)
    if s.greedy:
        j = jnp.argmax(base_k + q, axis=-1)
        token = jnp.take_along_axis(idx, j[:, None], axis=-1)[:, 0]
        sample_lp = jnp.zeros((N,), jnp.float32)
    else:
        sampling_k = jnp.take_along_axis(logits_NxV / temperature, idx, axis=-1) + q
        rows = jnp.arange(N)[:, None]
        sampling = jnp.full_like(logits_NxV, -jnp.inf).at[rows, idx].set(sampling_k)
        token = categorical(keys_N, sampling)
        j = jnp.argmax(idx == token[:, None], axis=-1)
        sample_lp = token_logprob(sampling_k, j)
    policy_lp = jnp.take_along_axis(policy_k, j[:, None], axis=-1)[:, 0]
    entropy = None
    if s.with_entropy:  # 0·log 0 = 0 where a top-k logit is −inf (a masked vocabulary)
        finite = policy_k > -jnp.inf
        entropy = -jnp.sum(jnp.where(finite, jnp.exp(policy_k) * policy_k, 0.0), axis=-1)

    def move(buf, axis):  # the chosen candidate's scratch slot copied into `slot`
        chosen = jnp.take_along_axis(buf, (scratch + j)[:, None, None, None], axis=axis)
        return jax.lax.dynamic_update_slice(buf, chosen, tuple(slot if a == axis else 0
                                                               for a in range(4)))  # fmt: skip

    valid = jax.lax.dynamic_update_slice(cache.valid_BxS, live_N[:, None], (0, slot))
    cache = KVCache(k=tuple(move(k, 3) for k in cache.k), v=tuple(move(v, 2) for v in cache.v),
                    valid_BxS=valid)  # fmt: skip
    return token.astype(jnp.int32), policy_lp, sample_lp, entropy, cache
