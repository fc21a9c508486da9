"""SFT on a task's reference solutions, evaluated before and after (experiments.sft)."""

from __future__ import annotations

import os
import time

from jaxpost import inputs, train
from jaxpost.recipes import common
from jaxpost.workdir import holding


@holding
def run(config) -> dict:
    """SFT with before/after evaluation; returns {"results", "wall_s", "model_dir"}."""
    start = time.perf_counter()
    train.resolve_loss_impl(config.loss_impl)
    common.lora_config(config)
    workdir = common.require_workdir(config)
    mesh = inputs.make_mesh(config.mesh)
    common.describe_devices(mesh)
    task = inputs.make_task(config.task)
    model = common.load(config, config.model).on(mesh)
    common.log(f"model: {model.describe()}")
    sets = common.eval_sets(config, task)
    examples = common.sft_examples(config, task, model, seed=config.seed, mesh=mesh,
                                   loss_impl=config.loss_impl,
                                   sample_batch=common.eval_rows(sets, config.eval, mesh) or None,
                                   lora_rank=config.lora_rank)  # fmt: skip
    results = {"before": common.evaluate_sets("before", model, model.params, sets, config.eval,
                                               mesh=mesh)}  # fmt: skip
    result = common.train_sft(config, model, examples, workdir=workdir, seed=config.seed,
                              mesh=mesh, loss_impl=config.loss_impl,
                              lora=common.lora_config(config))  # fmt: skip
    common.stop_if_preempted(result, "sft")
    params = result.params
    results["after SFT"] = common.evaluate_sets("after SFT", model, params, sets, config.eval,
                                                 mesh=mesh)  # fmt: skip
    model_dir = inputs.save_model(os.path.join(workdir, "model"), model, params)
    return common.report(workdir, results, config.eval, start, model_dir)
