"""GRPO with a task's verifier as the reward, evaluated before and after (experiments.grpo)."""

from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np

from jaxpost import importance, inputs, loops, losses, shaping, train
from jaxpost.errors import UserError
from jaxpost.recipes import common
from jaxpost.workdir import holding


def _check(config) -> None:
    g = config.grpo
    if g.loss_type not in losses.LOSS_TYPES:
        raise UserError(f"grpo.loss_type must be one of {losses.LOSS_TYPES}, got {g.loss_type!r}")
    if g.advantage_scale not in losses.ADVANTAGE_SCALES:
        raise UserError(f"grpo.advantage_scale must be one of {losses.ADVANTAGE_SCALES}")
    if not 0 <= g.unlikeliness_beta <= 1:
        raise UserError("grpo.unlikeliness_beta must lie in [0, 1]")
    if g.kl_beta < 0 or g.num_iterations < 1:
        raise UserError("grpo.kl_beta must be >= 0 and grpo.num_iterations >= 1")
    if not 0 <= g.eps_low <= 1 or g.eps_high < 0:
        raise UserError("grpo.eps_low must lie in [0, 1] and grpo.eps_high be >= 0")
    if g.is_correction:
        try:
            importance.check(g.is_mode, g.is_min or None, g.is_max)
        except ValueError as e:
            raise UserError(f"grpo.{e}") from None
    if config.reward not in ("answer", "chain"):
        raise UserError(f'reward must be "answer" or "chain", got {config.reward!r}')
    if not g.entropy_coef >= 0:
        raise UserError(f"grpo.entropy_coef must be >= 0 (an entropy bonus), got {g.entropy_coef}")
    practice(g, config.sampling.max_new_tokens)


def practice(g, max_new_tokens: int) -> shaping.Shaping:
    """The `shaping.Shaping` of a config's grpo fields; UserError naming the bad field."""
    try:
        settings = shaping.Shaping(
            dynamic_sampling=bool(g.dynamic_sampling), max_rounds=g.max_sampling_rounds,
            mask_truncated=bool(g.mask_truncated), overlong_buffer=g.overlong_buffer,
            overlong_factor=g.overlong_factor, entropy_top_frac=g.entropy_top_frac)  # fmt: skip
        settings.check_budget(max_new_tokens)
    except ValueError as e:
        message = str(e).replace("max_rounds", "max_sampling_rounds")
        raise UserError(f"grpo.{message} (see experiments/configs/grpo.py)") from None
    return settings


def _window(history: list[dict], key: str, first: bool, n: int = 10) -> float:
    rows = [h[key] for h in history if key in h]
    rows = rows[:n] if first else rows[-n:]
    return float(np.mean(rows)) if rows else float("nan")


@holding
def run(config) -> dict:
    """GRPO with before/after evaluation; returns {"results", "wall_s", "model_dir"}."""
    start = time.perf_counter()
    _check(config)
    common.lora_config(config)
    train.resolve_loss_impl(config.loss_impl)
    workdir = common.require_workdir(config)
    mesh = inputs.make_mesh(config.mesh)
    common.describe_devices(mesh)
    task = inputs.make_task(config.task)
    sampling = common.sampling_config(config.sampling)
    model = common.student(config, task, mesh)
    tok, L, g = model.tokenizer, config.loop, config.grpo
    common.log(f"start: {model.describe()}")

    problems = inputs.problems(task, "train", config.train_problems, config.seed)
    prompts = inputs.encode_prompts(model, [task.render_prompt(p) for p in problems],
                                    max_new_tokens=sampling.max_new_tokens, what="GRPO rollouts")  # fmt: skip
    verify = task.verify_answer if config.reward == "answer" else task.verify_chain

    def reward(i: int, completion: list[int]) -> float:
        return float(verify(problems[i], tok.decode(completion)))

    source = loops.PromptSource(prompts, reward=reward, eos_id=tok.eos_id, pad_id=tok.pad_id)
    rows = L.batch_size * sampling.group_size
    sets = common.eval_sets(config, task)
    inputs.check_memory(model.config, mesh, objective="grpo", loss_impl=config.loss_impl,
                        batch=rows, prompt_len=source.width(),
                        completion_len=sampling.max_new_tokens, with_reference=g.kl_beta > 0,
                        grad_accum=config.optim.grad_accum,
                        sample_batch=max(rows, common.eval_rows(sets, config.eval, mesh)),
                        lora_rank=config.lora_rank)  # fmt: skip
    results = {"start": common.evaluate_sets("start", model, model.params, sets, config.eval,
                                              mesh=mesh)}  # fmt: skip
    transform = None
    if g.unlikeliness_beta > 0:
        # He et al.: among a group's correct samples, the likelier ones earn less.
        def transform(rewards, seq_logprobs):
            return np.asarray(losses.unlikeliness_rewards(
                jnp.asarray(rewards), jnp.asarray(seq_logprobs), sampling.group_size,
                beta_rank=g.unlikeliness_beta))  # fmt: skip

    common.log(f"grpo: {L.steps} rounds of {L.batch_size} prompts x {sampling.group_size} "
               f"samples, lr {config.optim.learning_rate:g}, kl_beta {g.kl_beta:g}, "
               f"unlikeliness_beta {g.unlikeliness_beta:g}, reward {config.reward!r}")  # fmt: skip
    train_start = time.perf_counter()
    result = loops.run_grpo(
        model.config, model.params, source,
        common.optim_config(config.optim, L.steps * g.num_iterations),
        common.loop_config(L, seed=config.seed, workdir=workdir, desc="grpo"), sampling,
        ref_params=model.params if g.kl_beta > 0 else None, num_iterations=g.num_iterations,
        reward_transform=transform, advantage_scale=g.advantage_scale, loss_type=g.loss_type,
        kl_beta=g.kl_beta, eps_low=g.eps_low, eps_high=g.eps_high, mesh=mesh,
        loss_impl=config.loss_impl, is_correction=g.is_correction, is_mode=g.is_mode,
        is_min=g.is_min or None, is_max=g.is_max,
        shaping=practice(g, sampling.max_new_tokens), entropy_coef=g.entropy_coef,
        lora=common.lora_config(config),
    )  # fmt: skip
    common.stop_if_preempted(result, "grpo")
    if result.history:
        common.log(f"grpo: rollout pass rate {_window(result.history, 'pass_rate', True):.3f} "
                   f"(first 10 rounds) -> {_window(result.history, 'pass_rate', False):.3f} (last "
                   f"10) ({time.perf_counter() - train_start:.0f} s)")  # fmt: skip
    params = result.params
    results["after GRPO"] = common.evaluate_sets("after GRPO", model, params, sets, config.eval,
                                                  mesh=mesh)  # fmt: skip
    model_dir = inputs.save_model(os.path.join(workdir, "model"), model, params)
    return common.report(workdir, results, config.eval, start, model_dir)
