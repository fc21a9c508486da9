"""The head-to-head's train steps against their matmul floor; one JSON line per objective.

    python scripts/bench_train.py                        # sft, grpo, opd at the default shapes
    python scripts/bench_train.py --variant tiny --objectives sft --repeats 2

For each objective (sft, grpo, opd) the step the head-to-head compiles (`train.make_step` on
`train.{sft,grpo,opd}_objective`, AdamW, the state donated) runs at the shapes of the
`experiments/configs/paradigms.py` variant: the built-in student, SFT at the base's batch (packed
rows when `base.pack`) and the mixture's row width, GRPO and OPD on `arm.prompts_per_step × arm.group_size` rollouts of the
training prompts' width plus `arm.max_new_tokens`, OPD with a teacher of the student's shape.

The floor is a jitted chain of exactly the matmuls the step executes, at the same shapes,
forward and backward (each trained dot's two gradient dots; the teacher's dots forward only),
each on its own random operands and each waiting for the one before it, timed in the same
process with the runs interleaved.
`model_flops` counts those dots' FLOPs (2·m·k·n each, padding rows included, attention over
the full slot width as the model computes it); `model_flops_per_s` divides it by the step's
median time (after `--warmup` untimed rounds), `matmul_flops_per_s` by the chain's, and
`floor_ratio` = the chain's time / the step's: 1.0 would be a step that costs nothing beyond
its matmuls. `padding_share` is the share of the step's token slots that hold padding (work the
floor counts as useful).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("NO_GCE_CHECK", "true")

from jaxpost import hostmem  # noqa: E402

hostmem.reexec()  # the allocator the experiment mains run with: malloc on huge pages

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpost import data, inputs, losses, metrics_log, train  # noqa: E402


def dots(config, rows: int, length: int, head_rows: int) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of every dot of a forward over `rows` sequences of `length` slots whose
    LM head is applied to `head_rows` of them (in rows·slots)."""
    c, n = config, rows * length
    D, H, K, E, F = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim
    layer = [(1, n, D, H * E), (1, n, D, K * E), (1, n, D, K * E),  # q, k, v
             (rows * K, c.group_size * length, E, length),  # scores
             (rows * K, c.group_size * length, length, E),  # probs @ v
             (1, n, H * E, D), (1, n, D, F), (1, n, D, F), (1, n, F, D)]  # o, gate, up, down
    return layer * c.n_layers + [(1, head_rows, D, c.vocab_size)]


def flops(spec) -> int:
    return sum(2 * b * m * k * n for b, m, k, n in spec)


def matmul_chain(trained, frozen):
    """A jitted function of random operands running the frozen dots forward, then each trained
    dot forward, then each trained dot's two gradient dots in reverse order, as a step runs a
    teacher's forward, the student's forward and its backward. Each dot waits for the one before
    it (an optimization barrier, no arithmetic; a trained dot's two gradient dots wait for the
    pair before them and not for each other), as a model's dots wait for their inputs, so XLA's
    runtime cannot overlap dots the step could not overlap either. Every dot's result is
    returned, so none is dead code that XLA could drop. Returns a callable that runs it once
    (a `functools.partial` of the jitted function and its operands)."""
    keys = iter(jax.random.split(jax.random.key(0), 3 * (len(trained) + len(frozen))))

    def operands(spec):
        return [(jax.random.normal(next(keys), (b, m, k)), jax.random.normal(next(keys), (b, k, n)),
                 jax.random.normal(next(keys), (b, m, n))) for b, m, k, n in spec]  # fmt: skip

    def chain(ops_t, ops_f):
        results, prev = [], jnp.zeros(())

        def after(x):  # x, released once `prev` is computed; `prev` kept as a result
            x, kept = jax.lax.optimization_barrier((x, prev))
            results.append(kept)
            return x

        for a, b, _ in [*ops_f, *ops_t]:  # forward: y = a @ b
            prev = jnp.matmul(after(a), b)
        for a, b, cot in reversed(ops_t):  # backward: da = cot @ b^T, db = a^T @ cot
            cot = after(cot)
            prev = (jnp.einsum("bmn,bkn->bmk", cot, b), jnp.einsum("bmk,bmn->bkn", a, cot))
        return results, prev

    return functools.partial(jax.jit(chain), operands(trained), operands(frozen))


def shapes(config_variant: str, overrides: str = ""):
    """The variant's student (`overrides` appended to its model_overrides), and its SFT and
    on-policy batch shapes."""
    from experiments.configs import paradigms
    from jaxpost.headtohead import models as hmodels

    c = paradigms.get_config(config_variant or None)
    c.workdir = "/nonexistent"  # never written: only shapes are read
    if overrides:
        c.model_overrides = ",".join(x for x in (c.model_overrides, overrides) if x)
    w = hmodels.world(c)
    student = inputs.load_model(c.model, tokenizer=c.tokenizer, overrides=c.model_overrides,
                                dtype=c.dtype, seed=0, remat=c.remat)  # fmt: skip
    examples = inputs.encode_examples(student, hmodels.mixture(w, c.base.style, c.seed), "sft")
    prompts = inputs.encode_prompts(student, [w.task.render_prompt(p) for p in w.train],
                                    max_new_tokens=c.arm.max_new_tokens, what="prompts")  # fmt: skip
    return c, student, examples, prompts


def prepare(variant: str = "", overrides: str = "", objectives=("sft", "grpo", "opd")):
    """The variant's student config and, per objective, its compiled train step at the
    head-to-head's shapes: {name: dict(step=a no-argument callable running one step and
    returning the loss, compile_s, trained/teacher dot specs, real (non-padding share), shape)}.
    The step is `train.make_step` on the objective, AdamW, its state donated (a fresh state per
    objective, carried from call to call)."""
    c, student, examples, prompts = shapes(variant, overrides)
    cfg, params = student.config, student.params
    rng = np.random.default_rng(0)
    optimizer = train.make_optimizer(train.OptimConfig(learning_rate=1e-4, warmup_steps=5,
                                                       total_steps=1000))  # fmt: skip
    rows = c.arm.prompts_per_step * c.arm.group_size
    P = data.round_up(max(len(p) for p in prompts), inputs.PAD_MULTIPLE)
    M = c.arm.max_new_tokens
    width = data.pair_width(examples)
    runs = {}
    for name in objectives:
        if name == "sft":
            if c.base.pack:  # the base's packed rows (data.pack_plan), its 10th step
                packed = data.pack_plan([len(p) + len(q) for p, q in examples],
                                        c.base.batch_size, width, c.seed, 10)[-1]  # fmt: skip
                batch = data.packed_sft_batch(examples, packed, student.tokenizer.pad_id, width)
            else:
                idx = rng.choice(len(examples), c.base.batch_size, replace=False)
                batch = data.sft_batch([examples[i] for i in idx], student.tokenizer.pad_id,
                                       length=width)  # fmt: skip
            objective, frozen = train.sft_objective(cfg), ()
            spec = dots(cfg, c.base.batch_size, width, c.base.batch_size * (width - 1))
            real = float((np.asarray(batch.attention_mask) > 0).mean())
            trained, teacher = spec, []
        else:
            chosen = rng.choice(len(prompts), rows)
            pt, pm = data.left_pad([prompts[i] for i in chosen], P, student.tokenizer.pad_id)
            lengths = rng.integers(M // 2, M + 1, rows)
            comp_mask = (np.arange(M)[None] < lengths[:, None]).astype(np.int32)
            comp = rng.integers(3, cfg.vocab_size, (rows, M)).astype(np.int32) * comp_mask
            batch = data.CompletionBatch(pt, pm, comp, comp_mask,
                                         old_logp=np.full((rows, M), -1.0, np.float32),
                                         advantages=rng.normal(size=rows).astype(np.float32))  # fmt: skip
            trained = dots(cfg, rows, P + M, rows * M)
            real = float(np.concatenate([pm, comp_mask], 1).mean())
            if name == "grpo":
                objective, frozen, teacher = train.grpo_objective(cfg), (), []
            else:
                objective = train.opd_objective(cfg, cfg, losses.opd_kl(1.0))
                frozen, teacher = (params,), trained
        batch = jax.tree.map(lambda x: None if x is None else jnp.asarray(x), batch)
        step = jax.jit(train.make_step(objective, optimizer), donate_argnums=0)
        state = [train.init_state(params, optimizer)]

        def run_step(step=step, batch=batch, frozen=frozen, state=state):
            state[0], metrics = step(state[0], batch, *frozen)
            return metrics["loss"]

        start = time.perf_counter()
        jax.block_until_ready(run_step())
        runs[name] = dict(step=run_step, compile_s=time.perf_counter() - start, trained=trained,
                          teacher=teacher, real=real,
                          shape=dict(rows=int(batch.tokens.shape[0]) if name == "sft" else rows,
                                     slots=width if name == "sft" else P + M))  # fmt: skip
    return c, cfg, runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="", help="experiments/configs/paradigms.py variant")
    ap.add_argument("--objectives", default="sft,grpo,opd")
    ap.add_argument("--overrides", default="", help="more model overrides, e.g. scan_layers=0")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds before the timed ones")
    ap.add_argument("--out", default=None, help="also append every JSON line to this file")
    args = ap.parse_args(argv)

    _, cfg, runs = prepare(args.variant, args.overrides, args.objectives.split(","))
    for r in runs.values():
        r["chain"] = matmul_chain(r["trained"], r["teacher"])
        jax.block_until_ready(r["chain"]())
        r["flops"] = 3 * flops(r["trained"]) + flops(r["teacher"])
        r["times"] = ([], [])
    # Interleaved, so drift in machine load hits every run alike. The first rounds after
    # compiling run 2-3x slower (the allocator faulting in fresh buffers; 2026-12-05, AMD EPYC
    # Zen 5 2-core): untimed warm-up rounds keep them out of the medians.
    for round_ in range(args.warmup + args.repeats):
        for r in runs.values():
            for i, fn in enumerate((r["step"], r["chain"])):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                if round_ >= args.warmup:
                    r["times"][i].append(time.perf_counter() - start)
    for name, r in runs.items():
        step_s, chain_s = (statistics.median(t) for t in r["times"])
        line = {"bench": "train_floor", "objective": name, "variant": args.variant or "builtin",
                **r["shape"], "d_model": cfg.d_model, "layers": cfg.n_layers,
                "vocab": cfg.vocab_size, "scan_layers": cfg.scan_layers,
                "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                "compile_s": round(r["compile_s"], 2), "step_s": round(step_s, 7),
                "matmul_s": round(chain_s, 7), "model_flops": r["flops"],
                "model_flops_per_s": round(r["flops"] / step_s), "matmul_flops_per_s":
                round(r["flops"] / chain_s), "floor_ratio": round(chain_s / step_s, 3),
                "padding_share": round(1 - r["real"], 3)}  # fmt: skip
        metrics_log.print_json_line(line, args.out)


if __name__ == "__main__":
    main()
