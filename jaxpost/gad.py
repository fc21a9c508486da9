"""GAD, generative adversarial distillation: on-policy distillation from a black-box teacher.

"Black-Box On-Policy Distillation of Large Language Models" (2511.10643; code microsoft/LMOps
gad/) distils from a teacher it can only sample: no logits, no shared tokenizer. The student is
a generator; a discriminator D, initialised from the student with a scalar head on the last
token, learns to tell the teacher's response y_t to a prompt from the student's samples y_s by a
Bradley-Terry loss

    L_D = -log σ(D(x, y_t) - D(x, y_s))        (one term per student sample)

and the student is trained by GRPO on D's score as its reward (an on-policy reward model that
co-evolves with it): r(y_s) = D(x, y_s), group-normalised. Both move once per step from the same
batch (the reward is read from D before its update). A warm-up stage first fits the student to
the teacher's responses by SFT while D learns by the same BT loss.

    result = run(config, params, teacher_config, teacher_params, source, optim, loop, sampling,
                 warmup=20)
    result.state.params["disc"]      # the discriminator, checkpointed with the policy

Ours: D is a copy of the base (not of the warmed-up student) with a zero-initialised linear head
on the final-normed hidden state of the last completion token; the teacher's response is drawn
from the teacher model each step (one per prompt, shared by the prompt's group), not read from a
fixed dataset; the warm-up is the first `warmup` steps of the same run (same optimizer, same
budget); policy and discriminator share one optimizer (the paper has one each), D's updates
scaled by `disc_lr_scale` — so one global-norm clip spans both trees and D's weight decay is
scaled with its step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpost import data, losses, models, qsharp, rollouts, sampler, train
from jaxpost.lora import LoraConfig
from jaxpost.models import ModelConfig
from jaxpost.on_policy import run_on_policy
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig, RunResult
from jaxpost.token_choice import value_head


def init_discriminator(params) -> dict:
    """D's parameters: a copy of `params` (the base) and a zero scalar head, so D starts
    indifferent (every score 0): the tree of Q♯'s value model (`qsharp.init_value`)."""
    return qsharp.init_value(params)


def scores(config: ModelConfig, disc, prompt_NxP, prompt_mask_NxP, completion_NxM,
           completion_mask_NxM) -> jax.Array:  # fmt: skip
    """D(x, y) [N]: the head on the hidden state of each row's last completion token."""
    P = prompt_NxP.shape[1]
    tokens = jnp.concatenate([prompt_NxP, completion_NxM], axis=1)
    mask = jnp.concatenate([prompt_mask_NxP, completion_mask_NxM], axis=1)
    hidden = models.hidden_states(config, disc["model"], tokens, mask)
    last = P + jnp.maximum(completion_mask_NxM.sum(1).astype(jnp.int32), 1) - 1
    return value_head(jnp.take_along_axis(hidden, last[:, None, None], axis=1), disc["head"])[:, 0]


def bt_loss(teacher_N, student_N) -> jax.Array:
    """Bradley-Terry: mean over pairs of -log σ(D(teacher) - D(student))."""
    return jnp.mean(jax.nn.softplus(student_N - teacher_N))


def objective(config: ModelConfig, group_size: int, *, loss_impl: str = "materialized",
              **grpo_kwargs) -> train.Objective:  # fmt: skip
    """The joint step's objective on the tree {"policy", "disc"} and a batch of student rollouts
    with the teacher's responses in `demo`: BT for D, plus for the policy GRPO's clipped loss on
    D's group-normalised scores (`grpo_kwargs` as for `train.grpo_objective`), or on a warm-up
    step (`batch.demo_sft`) the token-mean cross-entropy of the teacher's responses. The two
    losses touch disjoint parameters, so their sum's gradient is each one's own. aux:
    `disc_loss`, `disc_acc` (share of pairs D ranks right), `disc_student`/`disc_teacher`
    (mean scores), `sft_nll` and GRPO's aux (zeros on warm-up steps)."""
    grpo = train.grpo_objective(config, loss_impl=loss_impl, **grpo_kwargs)
    logprobs = train.completion_logprobs

    def fn(trained, batch: data.CompletionBatch):
        disc = trained["disc"]
        s = scores(config, disc, batch.prompt_tokens, batch.prompt_mask, batch.completion,
                   batch.completion_mask)  # fmt: skip
        t = scores(config, disc, batch.prompt_tokens, batch.prompt_mask, batch.demo,
                   batch.demo_mask)  # fmt: skip
        d_loss = bt_loss(t, s)
        adv, _ = losses.group_advantages(jax.lax.stop_gradient(s), group_size)
        rl_batch = batch.replace(advantages=adv)
        demo = batch.replace(completion=batch.demo, completion_mask=batch.demo_mask)

        def rl(policy):
            return grpo(policy, rl_batch)

        shapes = jax.eval_shape(rl, trained["policy"])[1]

        def sft(policy):
            m = batch.demo_mask.astype(jnp.float32)
            lp = logprobs(config, policy, demo, loss_impl=loss_impl)
            nll = -(lp * m).sum() / jnp.maximum(m.sum(), 1.0)
            return nll, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

        warm = jnp.max(batch.demo_sft) > 0
        p_loss, aux = jax.lax.cond(warm, sft, rl, trained["policy"])
        aux = {**aux, "disc_loss": d_loss, "disc_acc": jnp.mean((t > s).astype(jnp.float32)),
               "disc_student": jnp.mean(s), "disc_teacher": jnp.mean(t),
               "sft_nll": jnp.where(warm, p_loss, 0.0), "warmup": warm.astype(jnp.float32)}  # fmt: skip
        return p_loss + d_loss, jax.lax.stop_gradient(aux)

    return fn


def teacher_responses(teacher_config: ModelConfig, teacher_params, source: PromptSource,
                      problems, sampling: SamplingConfig, seed: int) -> sampler.HostRollouts:  # fmt: skip
    """One teacher sample of each prompt in `problems` (its token ids: all GAD reads of it)."""
    prompt, mask = data.left_pad([source.prompts[i] for i in problems], source.width(),
                                 source.pad_id)  # fmt: skip
    return sampler.generate_rows(
        teacher_config, teacher_params, prompt, mask, np.arange(len(problems), dtype=np.int32),
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, eos_id=source.eos_id, pad_id=source.pad_id,
        seed=seed)  # fmt: skip


def with_demos(batch: data.CompletionBatch, demo, demo_mask, group_size: int,
               warm: bool) -> data.CompletionBatch:  # fmt: skip
    """The student's batch with each prompt's teacher response (`demo`/`demo_mask`: one row per
    prompt, in the batch's prompt order) repeated over its group, and the warm-up flag."""
    if len(demo) * group_size != batch.rows:
        raise ValueError(f"{len(demo)} teacher responses for {batch.rows} rows in groups of "
                         f"{group_size}: give one response per prompt of the batch")  # fmt: skip
    rep = lambda a: np.repeat(np.asarray(a), group_size, axis=0)  # noqa: E731
    return batch.replace(demo=rep(demo), demo_mask=rep(demo_mask),
                         demo_sft=np.full((batch.rows,), float(warm), np.float32))  # fmt: skip


def scale_updates(name: str, factor: float) -> optax.GradientTransformation:
    """Chained after the optimizer: the updates of the trained tree's `name` subtree times
    `factor` (the discriminator's learning rate as a multiple of the policy's)."""

    def update(updates, state, params=None):
        return {**updates, name: jax.tree.map(lambda u: u * factor, updates[name])}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def run(config: ModelConfig, params, teacher_config: ModelConfig, teacher_params,
        source: PromptSource, optim: train.OptimConfig, loop: LoopConfig,
        sampling: SamplingConfig, *, warmup: int = 0, disc_lr_scale: float = 1.0,
        loss_impl: str = "auto",
        lora: LoraConfig | None = None, mesh=None, **grpo_kwargs) -> RunResult:  # fmt: skip
    """GAD from `params` (student and discriminator) against the teacher's samples: steps
    1..`warmup` the warm-up, then GRPO on the discriminator's score; the discriminator's
    updates are the optimizer's times `disc_lr_scale`. The teacher is used only
    through its sampled token ids (a black box; with another tokenizer its texts would be
    re-encoded, not done here: the vocabularies must match). Metrics: `reward` (the verifier's,
    logged only) and `teacher_reward` besides the step's aux. One device, no LoRA."""
    if mesh is not None or lora is not None:
        raise ValueError("GAD trains its discriminator beside the policy on one device: pass "
                         "mesh=None and lora=None")  # fmt: skip
    if teacher_config.vocab_size != config.vocab_size:
        raise ValueError(f"GAD reads the teacher's responses in the student's tokens: the "
                         f"vocabularies must match, got {teacher_config.vocab_size} and "
                         f"{config.vocab_size}")  # fmt: skip
    if source.reward is None or jax.process_count() > 1:
        raise ValueError("GAD logs the verifier's reward (a PromptSource with one) and runs in "
                         "one process")  # fmt: skip
    if not disc_lr_scale > 0:
        raise ValueError(f"GAD's disc_lr_scale must be > 0, got {disc_lr_scale}")
    if not 0 <= warmup <= loop.steps:
        raise ValueError(f"GAD's warm-up must lie in [0, {loop.steps}] steps, got {warmup}")
    G = sampling.group_size

    def collect(policy, step):
        r = rollouts.sample_step(config, policy, source, sampling, batch_size=loop.batch_size,
                                 seed=loop.seed, step=step, mesh=mesh)  # fmt: skip
        problems = r.problems[::G]
        t = teacher_responses(teacher_config, teacher_params, source, problems, sampling,
                              seed=(loop.seed * 1_000_003 + step + 7_919) % (2**31))  # fmt: skip
        r.batch = with_demos(r.batch, t.tokens, t.mask, G, warm=step <= warmup)
        ok = [source.reward(i, t.tokens[j, : int(t.lengths[j])].tolist())
              for j, i in enumerate(problems)]  # fmt: skip
        return r, {"reward": float(rollouts.rewards(source, r).mean()),
                   "teacher_reward": float(np.mean(ok))}  # fmt: skip

    fn = objective(config, G, loss_impl=loss_impl, **grpo_kwargs)
    return run_on_policy(config, params, source, fn, lambda r: (r.batch, {}), optim, loop,
                         sampling, mesh=mesh, collect=collect, lora=lora,
                         companions={"disc": init_discriminator(params)},
                         extra_transform=None if disc_lr_scale == 1 else scale_updates(
                             "disc", disc_lr_scale))  # fmt: skip


__all__ = ["bt_loss", "init_discriminator", "objective", "run", "scale_updates", "scores",
           "teacher_responses",
           "with_demos"]  # fmt: skip
