"""KV-cached on-device generation: the on-policy states of RL and distillation.

`generate` left-pads the prompts into a shape bucket, prefills a preallocated KV cache, and runs
the decode loop as a `lax.while_loop` inside one jitted program: no host round-trip per token, an
early exit once every row has stopped. Shapes are bucketed (batch, prompt length and the number of
new tokens rounded up), so a training run compiles a handful of programs rather than one per call.

Two logprobs come back per generated token:
  * `logprobs`: log π(y_t | y_<t) under the *untempered* policy, log_softmax(logits)[y_t]: the
    quantity the losses see, so sampling and training agree exactly;
  * `sample_logprobs`: the log-probability under the distribution actually sampled from
    (temperature, top-k, top-p applied; 0 for greedy), for importance corrections.

Randomness: the key of row r at step t is fold_in(fold_in(key(seed), r), t), where r is the row's
index in the unpadded output (prompt i, sample j -> r = i·num_samples + j). A seed therefore gives
the same tokens run after run, whatever the bucket.

Guided decoding (`guide=Guide(...)`, Q♯, `jaxpost.qsharp`): the value model keeps its own KV cache
in the same loop, scores the base's top-k tokens at every step, and the token is drawn from the
base's logits plus Q on them (`token_choice.choose_guided`); `logprobs` are then the untempered
guided policy's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpost import data, models, token_choice
from jaxpost.models import ModelConfig
from jaxpost.token_choice import Guide


@struct.dataclass
class Rollouts:
    """Generated completions; row r = prompt r // num_samples, sample r % num_samples.

    Attributes:
      tokens: [N, M] completion tokens (M = max_new_tokens), `pad_id` after the stop.
      logprobs: [N, M] log π(token) under the untempered policy; 0 where `mask` is 0.
      sample_logprobs: [N, M] log-probability under the sampling distribution (tempered and
        truncated); 0 for greedy decoding and where `mask` is 0.
      mask: [N, M] 1 for generated tokens (the stop token included), 0 after.
      lengths: [N] generated tokens per row, the stop token included.
      prompt_tokens: [N, P] the prompts, left-padded with `pad_id`.
      prompt_mask: [N, P] 1 on real prompt tokens.
      entropy: [N, M] entropy of the untempered next-token distribution (None unless asked).
    """

    tokens: jax.Array
    logprobs: jax.Array
    sample_logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    entropy: jax.Array | None = None

    def sequences(self) -> tuple[jax.Array, jax.Array]:
        """Prompt and completion side by side, [N, P + M], with their attention mask.

        Because prompts are left-padded, completion token j sits in slot P + j and is predicted by
        the logits of slot P + j - 1 of a teacher-forced forward over these sequences.
        """
        tokens = jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)
        mask = jnp.concatenate([self.prompt_mask, self.mask], axis=1)
        return tokens, mask


def _bucket(n: int, minimum: int) -> int:
    """Round up to a power of two, at least `minimum` (few distinct compiled shapes)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


DECODE_SEGMENTS = 4


def segment_ends(max_new_bucket: int) -> list[int]:
    """The step each decode segment ends at: up to `DECODE_SEGMENTS` segments of at least 16
    steps, the last ending at `max_new_bucket`. More segments attend over fewer empty slots, but
    each is its own loop in the program (compile time grows with them)."""
    length = max(16, -(-max_new_bucket // DECODE_SEGMENTS))
    return [min(end, max_new_bucket) for end in range(length, max_new_bucket + length, length)]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate_program(
    s: token_choice.Static, max_new_bucket: int, params, prompt_NxP, prompt_mask_NxP,
    row_ids_N, seed, max_new_tokens, temperature, top_p, guide=None,
):  # fmt: skip
    config = s.config
    N, P = prompt_NxP.shape
    M = max_new_bucket
    positions = models.positions_from_mask(prompt_mask_NxP)
    prompt_lengths = jnp.sum(prompt_mask_NxP, axis=1).astype(jnp.int32)
    ends = segment_ends(M)
    cache = models.init_cache(config, N, P + ends[0])
    # The stacked blocks' weights sliced per layer once, before the decode loop: XLA:CPU copies
    # slices taken inside the loop on every step (~1.5x slower decode, benchmarks/memory.md).
    # It costs a copy of the weights while generating, so accelerators (unmeasured) slice inside.
    layers = models.layer_params(config, params) if jax.default_backend() == "cpu" else None
    logits, cache = models.forward_cached(
        config, params, prompt_NxP, positions, prompt_mask_NxP, cache, 0, last_only=True,
        layers=layers,
    )  # fmt: skip
    if guide is not None:
        vcache, vlayers = token_choice.guide_prefill(guide, prompt_NxP, positions, prompt_mask_NxP,
                                                     P + ends[0])  # fmt: skip
    base_key = jax.random.key(seed)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(row_ids_N)
    stop_ids = jnp.asarray(s.stop_ids, jnp.int32)

    zeros_f = jnp.zeros((N, M), jnp.float32)
    state = dict(
        step=jnp.int32(0),
        logits=logits[:, 0],
        cache=cache,
        tokens=jnp.full((N, M), s.pad_id, jnp.int32),
        logprobs=zeros_f,
        sample_logprobs=zeros_f,
        entropy=zeros_f if s.with_entropy else None,
        done=jnp.zeros((N,), bool),
        lengths=jnp.zeros((N,), jnp.int32),
        vcache=vcache if guide is not None else None,
    )

    def cond(st, end):
        return (st["step"] < jnp.minimum(max_new_tokens, end)) & ~jnp.all(st["done"])

    def body(st):
        t = st["step"]
        keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
        live = ~st["done"]
        new = dict(st)
        if guide is None:
            token, lp, slp, ent = token_choice.choose(st["logits"], keys, s, temperature, top_p)
        else:
            token, lp, slp, ent, new["vcache"] = token_choice.choose_guided(
                st["logits"], keys, s, temperature, guide, st["vcache"], vlayers,
                prompt_lengths + t, P + t, live)  # fmt: skip
        token = jnp.where(live, token, s.pad_id)
        put = lambda buf, val: jax.lax.dynamic_update_slice(  # noqa: E731
            buf, jnp.where(live, val, 0.0)[:, None].astype(buf.dtype), (0, t)
        )
        new["tokens"] = jax.lax.dynamic_update_slice(st["tokens"], token[:, None], (0, t))
        new["logprobs"] = put(st["logprobs"], lp)
        new["sample_logprobs"] = put(st["sample_logprobs"], slp)
        if s.with_entropy:
            new["entropy"] = put(st["entropy"], ent)
        new["lengths"] = st["lengths"] + live.astype(jnp.int32)
        new["done"] = st["done"] | (live & jnp.any(token[:, None] == stop_ids[None, :], axis=1))
        logits, new["cache"] = models.forward_cached(
            config, params, token[:, None], (prompt_lengths + t)[:, None], live[:, None],
            st["cache"], P + t, layers=layers,
        )  # fmt: skip
        new["logits"] = logits[:, 0]
        new["step"] = t + 1
        return new

    # Decode in segments, each a loop over a cache that holds only the slots filled by its end,
    # grown between them: early steps do not attend over the empty rest of the cache.
    out = state
    for i, end in enumerate(ends):
        if i > 0:
            out["cache"] = models.grow_cache(out["cache"], P + end)
            if guide is not None:
                out["vcache"] = models.grow_cache(out["vcache"], out["vcache"].capacity + end
                                                  - ends[i - 1])  # fmt: skip
        out = jax.lax.while_loop(functools.partial(cond, end=end), body, out)
    mask = (jnp.arange(M)[None, :] < out["lengths"][:, None]).astype(jnp.int32)
    return (
        out["tokens"],
        out["logprobs"],
        out["sample_logprobs"],
        out["entropy"],
        mask,
        out["lengths"],
    )


def _validate(config, prompts, max_new_tokens, temperature, top_k, top_p, num_samples):
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(p) > config.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, longer than the model's maximum "
                f"{config.max_seq_len}"
            )
        if len(p) + max_new_tokens > config.max_seq_len:
            raise ValueError(
                f"prompt {i} ({len(p)} tokens) plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's maximum sequence length {config.max_seq_len}"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(
                f"prompt {i} has token ids outside the vocabulary [0, {config.vocab_size}): "
                f"min {lo}, max {hi}"
            )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def _run(config, params, arrays, max_new_bucket: int, *, max_new_tokens, temperature, top_k,
         top_p, eos_id, seed, stop_ids, pad_id, with_entropy, guide=None):  # fmt: skip
    """The compiled program on (prompt, prompt mask, row ids) arrays: its six outputs."""
    if guide is not None:
        guide.check(config, top_k, top_p)
    stops = tuple(sorted({*stop_ids, *([eos_id] if eos_id is not None else [])})) or (-1,)
    static = token_choice.Static(
        config=config, greedy=temperature == 0, top_k=top_k,
        use_top_p=top_p is not None and top_p < 1.0, with_entropy=with_entropy,
        stop_ids=stops, pad_id=pad_id,
    )  # fmt: skip
    return _generate_program(
        static, max_new_bucket, params, *arrays, jnp.uint32(seed), jnp.int32(max_new_tokens),
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p if top_p is not None else 1.0),
        *([guide] if guide is not None else []),
    )  # fmt: skip


def generate(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None,
    seed: int,
    num_samples: int = 1,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    with_entropy: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    guide: Guide | None = None,
) -> Rollouts:
    """Sample `num_samples` completions of each prompt with a KV cache, on device.

    Args:
      config, params: the model (a jaxpost preset or a checkpoint from `load_hf`).
      prompts: token-id lists of any lengths (each >= 1 token).
      max_new_tokens: M, the most tokens generated per row (the stop token included).
      temperature: 0 is greedy; otherwise logits are divided by it before sampling.
      top_k, top_p: truncations of the sampling distribution (None: off).
      eos_id, stop_ids: a row stops after emitting any of these.
      seed: fixes every random choice (see the module docstring for how keys are derived).
      num_samples: samples per prompt; rows of one prompt are contiguous (a GRPO group).
      pad_id: written after a row's stop and in prompt padding.
      with_entropy: also return the per-token entropy of the untempered policy.
      mesh: if given, the batch is sharded over its ('data', 'fsdp') axes.
      guide: Q♯ value guidance (`Guide`; then neither top_k nor top_p): the module docstring.
    """
    _validate(config, prompts, max_new_tokens, temperature, top_k, top_p, num_samples)
    n_rows = len(prompts) * num_samples
    row_multiple = 8
    if mesh is not None:
        row_multiple = math.lcm(row_multiple, mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
    N = data.round_up(_bucket(n_rows, 1), row_multiple)
    P = _bucket(max(len(p) for p in prompts), 16)
    M = _bucket(max_new_tokens, 16)
    if P + M > config.max_seq_len:  # the bucket may not exceed the model; fall back to exact sizes
        P = max(len(p) for p in prompts)
        M = min(M, config.max_seq_len - P)

    prompt = np.full((N, P), pad_id, np.int32)
    prompt_mask = np.zeros((N, P), np.int32)
    for i, p in enumerate(prompts):
        for j in range(num_samples):
            r = i * num_samples + j
            prompt[r, P - len(p) :] = p
            prompt_mask[r, P - len(p) :] = 1
    prompt[n_rows:, -1] = pad_id  # bucket-filler rows: one dummy token so attention is defined
    prompt_mask[n_rows:, -1] = 1
    args = (jnp.asarray(prompt), jnp.asarray(prompt_mask), jnp.arange(N, dtype=jnp.int32))
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        args = tuple(jax.device_put(a, batch) for a in args)
    tokens, logprobs, sample_lp, entropy, mask, lengths = _run(
        config, params, args, M, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed, stop_ids=stop_ids, pad_id=pad_id,
        with_entropy=with_entropy, guide=guide,
    )  # fmt: skip
    m = max_new_tokens
    return Rollouts(
        tokens=tokens[:n_rows, :m],
        logprobs=logprobs[:n_rows, :m],
        sample_logprobs=sample_lp[:n_rows, :m],
        mask=mask[:n_rows, :m],
        lengths=lengths[:n_rows],
        prompt_tokens=jnp.asarray(prompt[:n_rows]),
        prompt_mask=jnp.asarray(prompt_mask[:n_rows]),
        entropy=None if entropy is None else entropy[:n_rows, :m],
    )


def compiled_program_count() -> int:
    """How many distinct generation programs have been compiled in this process."""
    return _generate_program._cache_size()


@dataclasses.dataclass
class HostRollouts:
    """`generate_rows`' result: numpy arrays of the caller's rows (see `Rollouts`)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    sample_logprobs: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    entropy: np.ndarray | None


def generate_rows(
    config: ModelConfig,
    params,
    prompt_NxP: np.ndarray,
    prompt_mask_NxP: np.ndarray,
    row_ids_N: np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None,
    seed: int,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    with_entropy: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    guide: Guide | None = None,
) -> HostRollouts:
    """Sample one completion per row of already-padded prompts: a training loop's path.

    Unlike `generate`, the prompts arrive as the loop padded them (left-padded [N, P] at a
    run-wide width, never padded again, no bucketing), `row_ids_N` are the rows' indices in the
    global batch (their random keys, see the module docstring), and with a mesh each process
    passes only the rows its devices hold (`distributed.local_rows`): the program runs over the
    global mesh and each process gets back its own rows, as numpy arrays.
    """
    from jaxpost import distributed, sharding

    lengths = np.asarray(prompt_mask_NxP).sum(1)
    if (lengths < 1).any():
        raise ValueError("every prompt row needs at least one real token")
    if max_new_tokens < 1 or prompt_NxP.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(
            f"prompts of width {prompt_NxP.shape[1]} plus max_new_tokens={max_new_tokens} exceed "
            f"the model's maximum sequence length {config.max_seq_len}"
        )
    P = prompt_NxP.shape[1]
    M = min(_bucket(max_new_tokens, 16), config.max_seq_len - P)
    arrays = (np.asarray(prompt_NxP, np.int32), np.asarray(prompt_mask_NxP, np.int32),
              np.asarray(row_ids_N, np.int32))  # fmt: skip
    if mesh is not None:
        arrays = sharding.global_batch_from_local(arrays, mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():  # constraints apply
        out = _run(config, params, arrays, M, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed,
                   stop_ids=stop_ids, pad_id=pad_id, with_entropy=with_entropy,
                   guide=guide)  # fmt: skip
    tokens, logprobs, sample_lp, entropy, mask, lengths = (
        None if x is None else distributed.host_rows(x)[:, :max_new_tokens] if x.ndim == 2
        else distributed.host_rows(x) for x in out
    )  # fmt: skip
    return HostRollouts(tokens, logprobs, sample_lp, mask, lengths, entropy)
