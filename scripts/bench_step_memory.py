"""Temporary memory of whole jitted train steps, materialized vs fused-linear losses.

    python scripts/bench_kernels.py --step [--layers 24] [--remat none] [--vocab 32768 151936]

(`bench_kernels.py --step` calls `bench_step` here; this module also runs on its own with the
same flags.) For each objective (sft, grpo, opd), loss path (`loss_impl` materialized and
fused_linear) and vocabulary size, the step `train.make_step(objective, optimizer)` at
Qwen2.5-0.5B's shape (`models.get_config("qwen2.5-0.5b", vocab_size=V)`, optionally fewer layers
or another remat policy), AdamW, jitted by `train.jit_step` (state donated), is compiled from
abstract inputs (`jax.eval_shape` / `ShapeDtypeStruct`s: nothing is allocated), and one line is
printed:

    {"bench": "train_step", "objective": ..., "impl": ..., "V": ..., "model": "qwen2.5-0.5b",
     "tokens": 8192, "temp_bytes": ..., "remat": ..., "layers": ..., ...}

`temp_bytes` is XLA's `compiled.memory_analysis().temp_size_in_bytes`: everything the step
allocates besides its arguments (state, batch, frozen teacher or reference) and outputs. Tokens
are the rows that go through the LM head: SFT 8 sequences of 1025 tokens (8 x 1024 predicted);
GRPO and OPD 8 completions of 1024 tokens after 64-token prompts. OPD's teacher has the student's
shape and the loss is reverse KL (`opd_kl(1.0)`); GRPO has no reference policy unless
`--grpo-reference` (then its logprobs go through the same path). A last line per objective
checks issue 13's acceptance: fused temp at the largest V over fused at the smallest (<= 1.10)
and fused over materialized at the largest V (<= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxpost import data, losses, models, train  # noqa: E402

MODEL = "qwen2.5-0.5b"
OBJECTIVES = ("sft", "grpo", "opd")
IMPLS = ("materialized", "fused_linear")
ROWS, PROMPT, COMPLETION = 8, 64, 1024


def _program(objective: str, impl: str, config, grpo_reference: bool):
    """(objective function, abstract batch, abstract frozen arguments)."""
    s = jax.ShapeDtypeStruct
    params = models.abstract_params(config)
    if objective == "sft":
        tokens = s((ROWS, COMPLETION + 1), jnp.int32)
        return train.sft_objective(config, impl), data.SequenceBatch(tokens, tokens, tokens), ()
    batch = data.CompletionBatch(
        prompt_tokens=s((ROWS, PROMPT), jnp.int32), prompt_mask=s((ROWS, PROMPT), jnp.int32),
        completion=s((ROWS, COMPLETION), jnp.int32),
        completion_mask=s((ROWS, COMPLETION), jnp.int32),
    )  # fmt: skip
    if objective == "grpo":
        batch = batch.replace(old_logp=s((ROWS, COMPLETION), jnp.float32),
                              advantages=s((ROWS,), jnp.float32))  # fmt: skip
        kw = dict(with_reference=True, kl_beta=0.04) if grpo_reference else {}
        fn = train.grpo_objective(config, loss_impl=impl, **kw)
        return fn, batch, (params,) if grpo_reference else ()
    fn = train.opd_objective(config, config, losses.opd_kl(1.0), loss_impl=impl)
    return fn, batch, (params,)


def measure(objective: str, impl: str, vocab: int, args) -> dict:
    overrides = {"vocab_size": vocab}
    if args.layers:
        overrides["n_layers"] = args.layers
    if args.remat:
        overrides["remat"] = args.remat
    config = models.get_config(MODEL, **overrides)
    optimizer = train.make_optimizer(train.OptimConfig())
    fn, batch, frozen = _program(objective, impl, config, args.grpo_reference)
    state = jax.eval_shape(lambda p: train.init_state(p, optimizer), models.abstract_params(config))
    step = train.jit_step(train.make_step(fn, optimizer))
    start = time.perf_counter()
    memory = step.lower(state, batch, *frozen).compile().memory_analysis()
    return {
        "bench": "train_step", "objective": objective, "impl": impl, "V": vocab, "model": MODEL,
        "tokens": ROWS * COMPLETION, "temp_bytes": int(memory.temp_size_in_bytes),
        "remat": config.remat, "layers": config.n_layers, "scan_layers": config.scan_layers,
        "dtype": config.dtype, "param_dtype": config.param_dtype,
        "grpo_reference": args.grpo_reference if objective == "grpo" else None,
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "backend": jax.default_backend(), "compile_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def check(records: list[dict], objective: str) -> dict:
    """Issue 13's two ratios for one objective, from the records measured."""
    temp = {(r["impl"], r["V"]): r["temp_bytes"] for r in records if r["objective"] == objective}
    lo, hi = min(v for _, v in temp), max(v for _, v in temp)
    out = {"bench": "train_step_check", "objective": objective, "V": [lo, hi]}
    if ("fused_linear", lo) in temp and ("fused_linear", hi) in temp:
        out["fused_hi_over_lo"] = round(temp["fused_linear", hi] / temp["fused_linear", lo], 4)
        out["flat_in_V"] = out["fused_hi_over_lo"] <= 1.10
    if ("fused_linear", hi) in temp and ("materialized", hi) in temp:
        ratio = temp["fused_linear", hi] / temp["materialized", hi]
        out["fused_over_materialized"] = round(ratio, 4)
        out["at_most_half"] = ratio <= 0.5
    return out


def bench_step(args) -> None:
    records = []
    for objective in args.objectives:
        for vocab in args.vocab:
            for impl in args.impls or IMPLS:
                records.append(measure(objective, impl, vocab, args))
                print(json.dumps(records[-1]), flush=True)
        print(json.dumps(check(records, objective)), flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --step flags (bench_kernels.py shares --vocab and --impls)."""
    parser.add_argument("--layers", type=int, default=None, help="step: n_layers (default 24)")
    parser.add_argument("--remat", choices=["none", "full", "dots", "attn"], default=None,
                        help="step: the decoder's remat policy (default: the preset's)")  # fmt: skip
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--grpo-reference", action="store_true",
                        help="step: GRPO with a reference policy (KL term) as a frozen input")  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 151936])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None)
    bench_step(parser.parse_args(argv))


if __name__ == "__main__":
    main()
