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

The step is built as the loops build it (`jaxpost.plan_program.compiled_memory`). `temp_bytes`
is XLA's `compiled.memory_analysis().temp_size_in_bytes`: everything the step allocates besides
its arguments (state, batch, frozen teacher or reference) and outputs; `planned_bytes` is
`jaxpost.plan.plan(...).temp_bytes` for the same step (objective, loss path, widths, teacher or
reference, this backend's platform), nothing compiled. Tokens
are the rows that go through the LM head: SFT 8 sequences of 1025 tokens (8 x 1024 predicted);
GRPO and OPD 8 completions of 1024 tokens after 64-token prompts. OPD's teacher has the student's
shape and the loss is reverse KL (`opd_kl(1.0)`); GRPO has no reference policy unless
`--grpo-reference` (then its logprobs go through the same path). A last line per objective
checks issue 13's acceptance: fused temp at the largest V over fused at the smallest (<= 1.10),
fused over materialized at the largest V (<= 0.5), and the planner's largest relative error
(`planned_error_max`; `fused_planned_error_max` over the fused steps, needed <= 0.2).
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

from jaxpost import models, plan, plan_program  # noqa: E402

MODEL = "qwen2.5-0.5b"
OBJECTIVES = ("sft", "grpo", "opd")
IMPLS = ("materialized", "fused_linear")
ROWS, PROMPT, COMPLETION = 8, 64, 1024


def _widths(objective: str) -> dict:
    if objective == "sft":
        return dict(seq_len=COMPLETION + 1)
    return dict(prompt_len=PROMPT, completion_len=COMPLETION)


def measure(objective: str, impl: str, vocab: int, args) -> dict:
    overrides = {"vocab_size": vocab}
    if args.layers:
        overrides["n_layers"] = args.layers
    if args.remat:
        overrides["remat"] = args.remat
    config = models.get_config(MODEL, **overrides)
    step = dict(objective=objective, loss_impl=impl, **_widths(objective))
    if objective == "grpo":
        step["with_reference"] = args.grpo_reference
    if objective == "opd":
        step["teacher_config"] = config
    start = time.perf_counter()
    memory = plan_program.compiled_memory(config, rows=ROWS, **step)
    compile_s = round(time.perf_counter() - start, 1)
    planned = plan.plan(config, (1, 1, 1), batch=ROWS, platform=jax.default_backend(), **step)
    return {
        "bench": "train_step", "objective": objective, "impl": impl, "V": vocab, "model": MODEL,
        "tokens": ROWS * COMPLETION, "temp_bytes": int(memory.temp_size_in_bytes),
        "planned_bytes": planned.temp_bytes,
        "remat": config.remat, "layers": config.n_layers, "scan_layers": config.scan_layers,
        "dtype": config.dtype, "param_dtype": config.param_dtype,
        "grpo_reference": args.grpo_reference if objective == "grpo" else None,
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "backend": jax.default_backend(), "compile_s": compile_s,
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
    # The planner against compilation: the largest |planned / temp - 1|, over all and fused.
    errors = {(r["impl"], r["V"]): r["planned_bytes"] / r["temp_bytes"] - 1
              for r in records if r["objective"] == objective}  # fmt: skip
    out["planned_error_max"] = round(max(abs(e) for e in errors.values()), 4)
    fused = [abs(e) for (impl, _), e in errors.items() if impl == "fused_linear"]
    if fused:
        out["fused_planned_error_max"] = round(max(fused), 4)
        out["fused_planned_within_20pct"] = max(fused) <= 0.2
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
