"""GRPO / RLVR on Countdown with the verifier's reward, from an SFT model; before/after metrics.

    python -m experiments.grpo --config=experiments/configs/grpo.py --workdir=/tmp/jaxpost_grpo
    python -m experiments.grpo --config=experiments/configs/grpo.py --init=/tmp/jaxpost_sft/model

The command, what it prints and the measured numbers are in experiments/configs/grpo.py.
"""

from __future__ import annotations

import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common, sft
from experiments.configs import grpo as grpo_config
from jaxpost import data, loops, losses


def _check(config: ml_collections.ConfigDict) -> None:
    g = config.grpo
    if g.loss_type not in losses.LOSS_TYPES:
        raise common.ExperimentError(f"grpo.loss_type must be one of {losses.LOSS_TYPES}")
    if g.advantage_scale not in losses.ADVANTAGE_SCALES:
        raise common.ExperimentError(
            f"grpo.advantage_scale must be one of {losses.ADVANTAGE_SCALES}"
        )
    if not 0 <= g.unlikeliness_beta <= 1:
        raise common.ExperimentError("grpo.unlikeliness_beta must lie in [0, 1]")
    if g.kl_beta < 0 or g.num_iterations < 1:
        raise common.ExperimentError("grpo.kl_beta must be >= 0 and grpo.num_iterations >= 1")
    if config.reward not in ("answer", "chain"):
        raise common.ExperimentError(f'reward must be "answer" or "chain", got {config.reward!r}')


def _window(history: list[dict], key: str, first: bool, n: int = 10) -> float:
    rows = [h[key] for h in history if key in h]
    rows = rows[:n] if first else rows[-n:]
    return float(np.mean(rows)) if rows else float("nan")


def run(config: ml_collections.ConfigDict) -> dict:
    """GRPO with before/after evaluation; returns {"results", "wall_s", "model_dir"}."""
    start = time.perf_counter()
    _check(config)
    workdir = common.require_workdir(config)
    task = common.countdown_task(config.task)
    model = sft.starting_model(config, task, workdir, what="sft_init")
    tok, L, g = model.tokenizer, config.loop, config.grpo
    print(f"start: {model.describe()}", flush=True)

    train = common.problems(task, "train", config.train_problems, config.seed)
    prompts = common.encode_prompts(tok, [task.render_prompt(p) for p in train])
    common.check_lengths(model.config, prompts, L.max_new_tokens, "GRPO rollouts")
    verify = task.verify_answer if config.reward == "answer" else task.verify_chain

    def reward(i: int, completion: list[int]) -> float:
        return float(verify(train[i], tok.decode(completion)))

    source = loops.PromptSource(prompts, reward=reward, eos_id=tok.eos_id, pad_id=tok.pad_id)
    rows = L.batch_size * L.group_size
    seq_len = data.round_up(max(map(len, prompts)), 16) + L.max_new_tokens
    common.check_memory(model.config, batch=rows, seq_len=seq_len,
                        grad_accum=config.optim.grad_accum, sample_batch=rows,
                        max_new_tokens=L.max_new_tokens)  # fmt: skip

    sets = common.eval_sets(config, task)
    results = {"start": common.evaluate_model("start", model.config, model.params, tok, sets,
                                              config.eval)}  # fmt: skip

    transform = None
    if g.unlikeliness_beta > 0:
        # He et al.: among a group's correct samples, the likelier ones earn less.
        def transform(rewards, seq_logprobs):
            return np.asarray(losses.unlikeliness_rewards(
                jnp.asarray(rewards), jnp.asarray(seq_logprobs), L.group_size,
                beta_rank=g.unlikeliness_beta))  # fmt: skip

    print(f"grpo: {L.steps} rounds of {L.batch_size} prompts x {L.group_size} samples, "
          f"lr {config.optim.learning_rate:g}, kl_beta {g.kl_beta:g}, "
          f"unlikeliness_beta {g.unlikeliness_beta:g}, reward {config.reward!r}",
          flush=True)  # fmt: skip
    train_start = time.perf_counter()
    result = loops.run_grpo(
        model.config, model.params, source,
        common.optim_config(config.optim, L.steps * g.num_iterations),
        common.loop_config(L, seed=config.seed, workdir=workdir, desc="grpo",
                           group_size=L.group_size, max_new_tokens=L.max_new_tokens,
                           temperature=L.temperature),
        ref_params=model.params if g.kl_beta > 0 else None, num_iterations=g.num_iterations,
        reward_transform=transform, advantage_scale=g.advantage_scale, loss_type=g.loss_type,
        kl_beta=g.kl_beta, eps_low=g.eps_low, eps_high=g.eps_high,
    )  # fmt: skip
    if result.preempted:
        print("grpo: preempted; rerun the same command to resume", flush=True)
        return {"preempted": True}
    if result.history:
        print(f"grpo: rollout pass rate {_window(result.history, 'pass_rate', True):.3f} (first "
              f"10 rounds) -> {_window(result.history, 'pass_rate', False):.3f} (last 10) "
              f"({time.perf_counter() - train_start:.0f} s)", flush=True)  # fmt: skip
    params = result.state.params
    results["after GRPO"] = common.evaluate_model("after GRPO", model.config, params, tok, sets,
                                                  config.eval)  # fmt: skip
    model_dir = common.save_model(os.path.join(workdir, "model"), model, params)
    return common.report(workdir, results, config.eval, start, model_dir)


# Plain flags -> the config field each sets.
PLAIN_FLAGS = {"workdir": "workdir", "init": "init", "model": "init"}

if __name__ == "__main__":
    common.run_main(run, grpo_config.get_config, "experiments.grpo", PLAIN_FLAGS)
