"""The objectives `(params, batch, *frozen) -> (loss, aux)` of the three paradigms, on two paths.

`loss_impl` says how the LM head meets the loss; one choice for every objective (`LOSS_IMPLS`,
resolved by `resolve_loss_impl`):

  "materialized"   the [N, M, V] float32 logits are formed, then the dense loss (what the
                   objectives always did; the default of the functions here)
  "fused_linear"   the loss comes from the final hidden states and the head weight, in
                   vocabulary blocks, forward and backward (kernels.fused_linear_*): no
                   [N, M, V] array exists, the OPD teacher's and the GRPO reference's side too
  "auto"           fused_linear when V >= FUSED_MIN_VOCAB, else materialized
  "xla", "pallas_gpu", "pallas_tpu"   OPD: the D_α kernel over materialized logits
                   (`opd.opd_kl(impl=...)`); SFT and GRPO have no divergence and run
                   materialized

A tied model's head is its [V, D] embedding table, passed to the fused ops as stored
(`head_layout="VD"`): `models.head_weight`'s transpose would cost a [V, D] copy and the
gradient's transpose back another. Both paths compute the same values, gradients and aux.

Alignment: completions are laid out as the sampler returns them, left-padded prompts [N, P]
followed by completions [N, M], so completion token j sits in slot P + j and is predicted by the
hidden state of slot P + j - 1, in every view of the same completion (OPSD's privileged teacher
view included). Only those M slots go through the LM head, on either path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxpost import data, importance, losses, models, opd
from jaxpost.errors import UserError
from jaxpost.models import ModelConfig

Objective = Callable[..., tuple[jax.Array, dict]]

LOSS_IMPLS = ("auto", "materialized", "fused_linear", "xla", "pallas_gpu", "pallas_tpu")
KERNEL_IMPLS = ("xla", "pallas_gpu", "pallas_tpu")
# "auto" fuses from this vocabulary size on: the first V with more than one 4096-column block,
# i.e. where the fused path starts to save memory (below, its one block is the whole [N, V]
# tile and the backward's recomputation costs a matmul for nothing). benchmarks/kernels.md.
FUSED_MIN_VOCAB = 8192


def resolve_loss_impl(name: str, config: ModelConfig | None = None) -> str:
    """The loss path `name` means for a model: "auto" becomes "fused_linear" when the
    vocabulary has at least FUSED_MIN_VOCAB entries and "materialized" below; other names (and
    every name without a `config`: a check before any model is loaded) are returned as they
    are. UserError for a name not in LOSS_IMPLS."""
    if name not in LOSS_IMPLS:
        raise UserError(f"unknown loss_impl {name!r}; choose one of {', '.join(LOSS_IMPLS)}")
    if name == "auto" and config is not None:
        return "fused_linear" if config.vocab_size >= FUSED_MIN_VOCAB else "materialized"
    return name


def head_operand(config: ModelConfig, params) -> tuple[jax.Array, str]:
    """(head, layout) for the fused ops: the [V, D] table as stored ("VD") when embeddings are
    tied, else the [D, V] LM head ("DV")."""
    return (params["embed"], "VD") if config.tie_embeddings else (params["lm_head"], "DV")


def completion_hidden(config: ModelConfig, params, prompt_NxP, prompt_mask_NxP, completion_NxM,
                      completion_mask_NxM) -> jax.Array:  # fmt: skip
    """Hidden states [N, M, D] that predict each completion token (slots P-1 .. P+M-2)."""
    P, M = prompt_NxP.shape[1], completion_NxM.shape[1]
    tokens = jnp.concatenate([prompt_NxP, completion_NxM], axis=1)
    mask = jnp.concatenate([prompt_mask_NxP, completion_mask_NxM], axis=1)
    hidden = models.hidden_states(config, params, tokens, mask)
    return jax.lax.slice_in_dim(hidden, P - 1, P + M - 1, axis=1)


def head_logits(config: ModelConfig, params, hidden_NxMxD) -> jax.Array:
    head = models.head_weight(config, params)
    dt = config.compute_dtype
    return jnp.einsum(
        "nmd,dv->nmv", hidden_NxMxD.astype(dt), head.astype(dt), preferred_element_type=jnp.float32
    )


def completion_logits(config: ModelConfig, params, prompt_NxP, prompt_mask_NxP, completion_NxM,
                      completion_mask_NxM) -> jax.Array:  # fmt: skip
    """float32 logits [N, M, V] of the completion tokens, the LM head applied to M slots only."""
    hidden = completion_hidden(
        config, params, prompt_NxP, prompt_mask_NxP, completion_NxM, completion_mask_NxM
    )
    return head_logits(config, params, hidden)


def head_logprobs(config: ModelConfig, params, hidden_BxLxD, targets_BxL, mask_BxL, *,
                  loss_impl: str, with_entropy: bool = False, with_argmax: bool = False,
                  entropy_grad: bool = False):  # fmt: skip
    """`kernels.TokenLogprobs` [B, L] of the targets under the head, on the given path.

    logp is log softmax(h W)[y] (0 at masked positions on the fused path), entropy (a constant
    unless `entropy_grad`, e.g. for an entropy bonus) and is_argmax are filled when asked for.
    "materialized" forms the [B, L, V] logits; "fused_linear" never does.
    """
    import kernels

    if loss_impl == "fused_linear":
        b, l, d = hidden_BxLxD.shape
        head, layout = head_operand(config, params)
        out = kernels.fused_linear_logprobs(
            hidden_BxLxD.reshape(b * l, d), head, targets_BxL.reshape(b * l),
            mask=mask_BxL.reshape(b * l), head_layout=layout,
            compute_dtype=config.compute_dtype, with_entropy=with_entropy,
            with_argmax=with_argmax, entropy_grad=entropy_grad,
        )  # fmt: skip
        return jax.tree.map(lambda x: x.reshape(b, l), out)
    logits = head_logits(config, params, hidden_BxLxD)
    logp_BxLxV = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    entropy = is_argmax = None
    if with_entropy or entropy_grad:
        lp = logp_BxLxV if entropy_grad else jax.lax.stop_gradient(logp_BxLxV)
        finite = lp > -jnp.inf
        lp_safe = jnp.where(finite, lp, 0.0)  # 0·log 0 = 0, with a finite gradient there
        entropy = -jnp.where(finite, jnp.exp(lp_safe) * lp_safe, 0.0).sum(-1)
    if with_argmax:
        is_argmax = jnp.argmax(logits, axis=-1) == targets_BxL
    return kernels.TokenLogprobs(logp, entropy, is_argmax)


def plain_impl(name: str, config: ModelConfig) -> str:
    """SFT's and GRPO's path: the kernel names (divergences only) mean materialized logits."""
    impl = resolve_loss_impl(name, config)
    return "materialized" if impl in KERNEL_IMPLS else impl


def sft_objective(config: ModelConfig, loss_impl: str = "materialized") -> Objective:
    """Completion-only cross-entropy on a `data.SequenceBatch` (tokens, attention and loss masks;
    slot t predicts token t + 1); aux num_tokens, nll_sum, accuracy. `loss_impl`: module
    docstring ("fused_linear" takes the argmax hit from the same vocabulary sweep)."""
    impl = plain_impl(loss_impl, config)

    def objective(params, batch: data.SequenceBatch):
        if impl == "materialized":
            logits = models.apply(config, params, batch.tokens, batch.attention_mask)
            return losses.sft_loss(logits[:, :-1], batch.tokens[:, 1:], batch.loss_mask[:, 1:])
        hidden = models.hidden_states(config, params, batch.tokens, batch.attention_mask)
        mask = batch.loss_mask[:, 1:]
        out = head_logprobs(config, params, hidden[:, :-1], batch.tokens[:, 1:], mask,
                            loss_impl=impl, with_argmax=True)  # fmt: skip
        return losses.sft_loss_from_logprobs(out.logp, mask, out.is_argmax)

    return objective


def completion_logprobs(config: ModelConfig, params, batch: data.CompletionBatch, *,
                        loss_impl: str = "materialized") -> jax.Array:  # fmt: skip
    """Per-token log π(completion) [N, M] under a model, teacher-forced on its own prompt."""
    return _policy_logprobs(config, params, batch, plain_impl(loss_impl, config)).logp


@functools.cache
def jitted_completion_logprobs(config: ModelConfig, loss_impl: str = "materialized"):
    """`completion_logprobs` jitted once per (config, loss_impl): (params, batch) -> [N, M];
    every caller (evaluation, a loop scoring rollouts with a frozen model) shares its programs."""
    return jax.jit(functools.partial(completion_logprobs, config, loss_impl=loss_impl))


def _policy_logprobs(config, params, batch: data.CompletionBatch, impl: str, **flags):
    hidden = completion_hidden(config, params, batch.prompt_tokens, batch.prompt_mask,
                               batch.completion, batch.completion_mask)  # fmt: skip
    return head_logprobs(config, params, hidden, batch.completion, batch.completion_mask,
                         loss_impl=impl, **flags)  # fmt: skip


def grpo_objective(config: ModelConfig, *, loss_impl: str = "materialized",
                   with_reference: bool = False, is_correction: bool = False,
                   entropy_coef: float = 0.0, **loss_kwargs) -> Objective:  # fmt: skip
    """GRPO on a `data.CompletionBatch` with `old_logp` and `advantages` set.

    The loss counts the batch's `trained_mask()` tokens (its `loss_mask` when set: truncated
    completions, low-entropy tokens or filler groups left out by `jaxpost.shaping`).

    With `is_correction` the batch's `sampling_logp` (the sampler's logprobs under the tempered,
    truncated distribution it drew from) goes to `grpo_loss`, which weights each token's policy
    term by π_old/q (`jaxpost.importance`; `is_mode`, `is_min`, `is_max` in `loss_kwargs`).

    `entropy_coef` > 0 subtracts entropy_coef × the policy's mean entropy over the trained
    tokens from the loss (an entropy bonus; its gradient flows on both paths).

    With `with_reference` the objective takes the frozen reference policy's parameters as a
    third argument and computes its logprobs in the same program, on the same path (the KL
    term of `grpo_loss`, weighted by `kl_beta`); the reference is never part of the trained
    state. aux: `grpo_loss`'s (with a loss mask, the importance weights' statistics are over
    every sampled token), plus `entropy`, the policy's mean entropy over the trained tokens (on
    the fused path it comes from the same sweep as the logprobs).
    """
    impl = plain_impl(loss_impl, config)
    _check_entropy_coef(entropy_coef)

    def objective(params, batch: data.CompletionBatch, ref_params=None):
        ref_logp = None
        if with_reference:
            ref_logp = jax.lax.stop_gradient(_policy_logprobs(config, ref_params, batch, impl).logp)
        return _policy_gradient(config, params, batch, impl, batch.advantages, ref_logp,
                                is_correction, entropy_coef, loss_kwargs)  # fmt: skip

    return objective


def sampled_opd_objective(config: ModelConfig, teacher_config: ModelConfig, *, coef: float = 1.0,
                          loss_impl: str = "materialized", is_correction: bool = False,
                          entropy_coef: float = 0.0, **loss_kwargs) -> Objective:  # fmt: skip
    """Sampled-token on-policy distillation in GRPO's loss (`loops.run_sampled_opd`).

    The teacher (its parameters the third argument) scores the sampled tokens in its own view of
    the prompt (`batch.teacher_prompt()`); each token's advantage is the batch's advantage (the
    task reward's group advantage, zeros for pure distillation) plus
    coef · (log π_T(y_t) − log π_old(y_t)) (`opd.reverse_kl_token_advantages`, with the
    sampler's untempered logprobs as the student's). aux: `grpo_objective`'s plus
    `sampled_reverse_kl`, the mean of log π_old − log π_T over the trained tokens (the sampled
    estimate of KL(π_S ‖ π_T) per token).
    """
    if teacher_config.vocab_size != config.vocab_size:
        raise ValueError(
            f"teacher and student vocabularies differ ({teacher_config.vocab_size} vs "
            f"{config.vocab_size}); sampled-token distillation scores the student's token ids"
        )
    if not coef > 0:
        raise ValueError(f"coef must be > 0 (the distillation advantage's weight), got {coef}")
    impl, t_impl = plain_impl(loss_impl, config), plain_impl(loss_impl, teacher_config)
    _check_entropy_coef(entropy_coef)

    def objective(params, batch: data.CompletionBatch, teacher_params):
        prompt, prompt_mask = batch.teacher_prompt()
        hidden = completion_hidden(teacher_config, teacher_params, prompt, prompt_mask,
                                   batch.completion, batch.completion_mask)  # fmt: skip
        teacher_logp = jax.lax.stop_gradient(head_logprobs(
            teacher_config, teacher_params, hidden, batch.completion, batch.completion_mask,
            loss_impl=t_impl).logp)  # fmt: skip
        mask = batch.trained_mask()
        gap = opd.reverse_kl_token_advantages(batch.old_logp, teacher_logp, mask)
        reward = batch.advantages
        reward = reward[:, None] if reward.ndim == 1 else reward
        loss, aux = _policy_gradient(config, params, batch, impl, reward + coef * gap, None,
                                     is_correction, entropy_coef, loss_kwargs)  # fmt: skip
        count = jnp.maximum(mask.astype(bool).sum(), 1).astype(jnp.float32)
        return loss, {**aux, "sampled_reverse_kl": -gap.sum() / count}

    return objective


def _check_entropy_coef(entropy_coef: float) -> None:
    if not entropy_coef >= 0:
        raise ValueError(f"entropy_coef must be >= 0 (an entropy bonus), got {entropy_coef}")


def _policy_gradient(config, params, batch: data.CompletionBatch, impl: str, advantages,
                     ref_logp, is_correction: bool, entropy_coef: float, loss_kwargs):  # fmt: skip
    """GRPO's clipped loss on the batch's trained tokens, the entropy bonus and its aux."""
    out = _policy_logprobs(config, params, batch, impl, with_entropy=True,
                           entropy_grad=entropy_coef > 0)  # fmt: skip
    sampling = batch.sampling_logp if is_correction else None
    if is_correction and sampling is None:
        raise ValueError("is_correction needs the batch's sampling_logp (the sampler's)")
    mask = batch.trained_mask()
    loss, aux = losses.grpo_loss(out.logp, batch.old_logp, advantages, mask, ref_logp=ref_logp,
                                 sampling_logp=sampling, **loss_kwargs)  # fmt: skip
    if sampling is not None and batch.loss_mask is not None:
        # the weights' statistics over every sampled token, trained or not: the sampler/trainer
        # mismatch of the rollouts (a step whose loss mask is empty still reports it)
        _, is_aux = importance.weights(
            batch.old_logp.astype(jnp.float32), sampling, batch.completion_mask.astype(bool),
            loss_kwargs.get("is_mode", importance.DEFAULT_MODE), loss_kwargs.get("is_min"),
            loss_kwargs.get("is_max", importance.DEFAULT_MAX))  # fmt: skip
        aux = {**aux, **is_aux}
    valid = mask.astype(bool)
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    entropy = jnp.where(valid, out.entropy, 0.0).sum() / count
    if entropy_coef > 0:
        loss = loss - entropy_coef * entropy
    return loss, {**aux, "entropy": jax.lax.stop_gradient(entropy)}


def opd_objective(config: ModelConfig, teacher_config: ModelConfig, loss_fn,
                  loss_impl: str = "materialized") -> Objective:  # fmt: skip
    """On-policy distillation: the teacher scores the student's own completions.

    The batch is a `data.CompletionBatch`; for OPSD its teacher_prompt_* fields hold the
    teacher's (privileged) view of the prompt. The completion is the same in both views, so its
    positions align (module docstring) on either path. `loss_fn` is an `opd.OPDLossSpec`
    (`losses.opd_kl(alpha)`, `entropy_aware_opd_kl`, `prefix_opd`) or any function of
    (student_logits, teacher_logits, mask); the teacher's parameters are the third argument.

    `loss_impl` (module docstring): "materialized" calls `loss_fn` on both models' logits as it
    is; a kernel name sets an `opd_kl` spec's kernel (`OPDLossSpec.on_kernel`); "fused_linear"
    calls `loss_fn.from_hidden` with both models' hidden states and heads, the teacher's under
    stop_gradient, in the wider of the two models' compute dtypes. A plain function has no
    hidden-state form: "auto" then materializes, "fused_linear" and kernel names raise.
    """
    if teacher_config.vocab_size != config.vocab_size:
        raise ValueError(
            f"teacher and student vocabularies differ ({teacher_config.vocab_size} vs "
            f"{config.vocab_size}); token-level distillation needs one vocabulary"
        )
    impl = resolve_loss_impl(loss_impl, config)
    if not isinstance(loss_fn, opd.OPDLossSpec):
        if impl == "fused_linear" and loss_impl == "auto":
            impl = "materialized"
        elif impl != "materialized":
            raise UserError(
                f"loss_impl={loss_impl!r} needs an OPD loss built by jaxpost.opd (opd_kl, "
                f"entropy_aware_opd_kl, prefix_opd), not {loss_fn!r}; or use 'materialized'"
            )
    elif impl in KERNEL_IMPLS:
        loss_fn = loss_fn.on_kernel(impl)
    dtype = jnp.promote_types(config.compute_dtype, teacher_config.compute_dtype)

    def objective(params, batch: data.CompletionBatch, teacher_params):
        teacher_prompt, teacher_mask = batch.teacher_prompt()
        student = completion_hidden(config, params, batch.prompt_tokens, batch.prompt_mask,
                                    batch.completion, batch.completion_mask)  # fmt: skip
        teacher = completion_hidden(teacher_config, teacher_params, teacher_prompt, teacher_mask,
                                    batch.completion, batch.completion_mask)  # fmt: skip
        teacher = jax.lax.stop_gradient(teacher)
        if impl != "fused_linear":
            teacher_logits = head_logits(teacher_config, teacher_params, teacher)
            return loss_fn(head_logits(config, params, student),
                           jax.lax.stop_gradient(teacher_logits), batch.completion_mask)  # fmt: skip
        head, layout = head_operand(config, params)
        t_head, t_layout = head_operand(teacher_config, teacher_params)
        return loss_fn.from_hidden(student, head, teacher, jax.lax.stop_gradient(t_head),
                                   batch.completion_mask, head_layout=layout,
                                   teacher_head_layout=t_layout, compute_dtype=dtype)  # fmt: skip

    return objective


__all__ = ["FUSED_MIN_VOCAB", "KERNEL_IMPLS", "LOSS_IMPLS", "Objective", "completion_hidden",
           "completion_logits", "completion_logprobs", "grpo_objective", "head_logprobs",
           "head_logits", "head_operand", "opd_objective", "plain_impl", "resolve_loss_impl", "sampled_opd_objective",
           "sft_objective"]  # fmt: skip
