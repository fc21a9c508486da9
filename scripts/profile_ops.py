"""Where a compiled program's time goes, op by op: its thunks in a profiler trace, each joined to
its instruction in XLA's optimized HLO, grouped by what the instruction computes.

    python scripts/profile_ops.py sampler               # bench_sampler.py's small shape, greedy
    python scripts/profile_ops.py sft --variant tiny    # a train step of bench_train.py (sft,
    python scripts/profile_ops.py grpo --top 40         #   grpo or opd) at the head-to-head's shapes

The target runs twice untraced (compilation, warm-up), then `--runs` times under
`jax.profiler.trace`. XLA dumps the optimized HLO of every module it compiles in this process
(`--xla_dump_to` is added to XLA_FLAGS before JAX starts); the module whose instructions carry
most of the traced time is the target's, and every traced event named after one of its
instructions is summed. Instructions are grouped by what they compute: the opcode and output
shape, and for a fusion the dots, convolutions and reductions inside it with their operand
shapes; a YNNPACK or XNNPACK fusion says so. One JSON line per group, most time first:
`us_per_run`, `calls_per_run`, `us_per_call`, `share` (of the target's summed op time) and, for
the sampler, `us_per_step` (per decode step). A summary line ends it: `wall_ms_per_run`,
`op_ms_per_run` (summed over threads: above the wall time where ops ran side by side),
`ops_per_run`, `groups`, and `library_share` (time in YNNPACK/XNNPACK fusions).

An op's time is its event's wall time on its thread: it includes time the thread waited on a
thread pool or was descheduled while other threads (XLA's, YNNPACK's) had the cores, so a cheap
op beside busy ones can read long, and the summed op time can exceed the wall time. Read the
big groups, and confirm a lead by timing the program with and without the change.
Made for XLA:CPU (its thunks are the trace's events); on a GPU the events are kernels, named
differently, and few will match. Times are this machine's: compare programs in one process.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import glob
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_train's step builder
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("NO_GCE_CHECK", "true")

from jaxpost import hostmem  # noqa: E402

hostmem.reexec()  # the allocator the benchmarks run with, before the dump directory exists

_DUMP = tempfile.mkdtemp(prefix="profile_ops_hlo_")
atexit.register(shutil.rmtree, _DUMP, ignore_errors=True)  # also on --help, errors, Ctrl-C
if "--help" not in sys.argv and "-h" not in sys.argv:  # before JAX reads its flags
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={_DUMP}", "--xla_dump_hlo_as_text"]
    ).strip()

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")
_LAYOUT = re.compile(r"\{[^{}]*\}")
_SKIP = ("while", "conditional", "call")  # their events span other instructions' events
_PLUMBING = {"parameter", "constant", "bitcast", "broadcast", "reshape", "tuple",
             "get-tuple-element", "iota", "copy"}  # named only when a fusion holds nothing else


def parse_hlo(text: str) -> dict[str, dict]:
    """{computation: {instruction: (shape, opcode, operands, attributes)}} of an HLO module."""
    comps, current = {}, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = comps.setdefault(m.group(1), {})
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, opcode, rest = m.groups()
            operands = re.findall(r"%?([\w.\-]+)", rest.split(")")[0])
            current[name] = (_LAYOUT.sub("", shape), opcode, operands, rest)
    return comps


def _describe_op(comp: dict, name: str) -> str:
    shape, opcode, operands, rest = comp[name]
    if opcode in ("dot", "convolution"):
        ins = " x ".join(comp[o][0] if o in comp else "?" for o in operands[:2])
        dims = ",".join(re.findall(r"(?:lhs|rhs)_\w+_dims=\{[\d,]*\}", rest))
        return f"{opcode} {shape} = {ins} ({dims})"
    if opcode == "reduce":
        src = comp[operands[0]][0] if operands and operands[0] in comp else "?"
        return f"reduce {src} -> {shape}"
    return f"{opcode} {shape}"


def describe(comps: dict, comp: dict, name: str) -> tuple[str, str]:
    """(kind, what it computes) of one instruction."""
    shape, opcode, operands, rest = comp[name]
    if opcode != "fusion":
        return opcode, _describe_op(comp, name)
    kind = "fusion"
    for lib in ("ynn", "xnn"):
        if f"__{lib}_fusion" in rest:
            kind = f"{lib}_fusion"
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    body = comps.get(called.group(1), {}) if called else {}
    inner = [_describe_op(body, n) for n, (_, op, _, _) in body.items()
             if op in ("dot", "convolution", "reduce", "reduce-window")]  # fmt: skip
    if not inner:  # an elementwise or data-movement fusion: its distinct operations
        inner = [" ".join(sorted({op for _, op, _, _ in body.values()} - _PLUMBING))]
    return kind, f"fusion {shape}" + (f" [{'; '.join(inner)}]" if any(inner) else "")


def trace_events(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
    """Summed duration (µs) and count of every event on XLA's CPU threads, by name."""
    from jax.profiler import ProfileData

    total, count = collections.Counter(), collections.Counter()
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                if "XLA" not in line.name:
                    continue
                for event in line.events:
                    total[event.name] += event.duration_ns / 1e3
                    count[event.name] += 1
    return total, count


def op_table(total, count, runs: int, steps: int | None = None) -> tuple[list[dict], dict]:
    """Join the traced events to the dumped module that holds most of their time."""
    best = None
    for path in glob.glob(os.path.join(_DUMP, "*after_optimizations.txt")):
        comps = parse_hlo(open(path).read())
        owner = {n: c for c in comps.values() for n, (_, op, _, _) in c.items() if op not in _SKIP}
        matched = sum(t for n, t in total.items() if n in owner)
        if best is None or matched > best[0]:
            best = (matched, comps, owner, os.path.basename(path))
    if best is None or best[0] == 0:
        raise SystemExit("profile_ops: no traced event matched a dumped HLO instruction (XLA:CPU "
                         "only; is XLA_FLAGS overriding --xla_dump_to?)")  # fmt: skip
    matched, comps, owner, module = best
    groups = collections.defaultdict(lambda: [0.0, 0])
    for name, t in total.items():
        if name in owner:
            g = groups[describe(comps, owner[name], name)]
            g[0] += t
            g[1] += count[name]
    rows = []
    for (kind, what), (t, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        row = {"kind": kind, "op": what, "us_per_run": round(t / runs, 1),
               "calls_per_run": round(n / runs, 2), "us_per_call": round(t / n, 2),
               "share": round(t / matched, 4)}  # fmt: skip
        if steps:
            row["us_per_step"] = round(t / runs / steps, 2)
        rows.append(row)
    library = sum(t for (kind, _), (t, _) in groups.items() if kind in ("ynn_fusion", "xnn_fusion"))
    summary = {"module": module, "op_ms_per_run": round(matched / runs / 1e3, 3),
               "ops_per_run": round(sum(n for _, n in groups.values()) / runs, 1),
               "groups": len(groups), "library_share": round(library / matched, 4)}  # fmt: skip
    return rows, summary


def sampler_target(args):
    """bench_sampler.py's model shape with random weights, greedy `generate`."""
    import jax
    import numpy as np

    from jaxpost import models, sampler

    w = args.width
    config = models.ModelConfig(
        family="qwen2", vocab_size=args.vocab, d_model=w, n_layers=args.layers,
        n_heads=max(1, w // 64), n_kv_heads=max(1, w // 128), head_dim=64, mlp_dim=4 * w,
        max_seq_len=max(1024, args.prompt + args.new), qkv_bias=True, tie_embeddings=True,
    )  # fmt: skip
    params = models.init(config, seed=0)
    prompts = np.random.default_rng(0).integers(3, args.vocab, (args.batch, args.prompt)).tolist()

    def run():
        out = sampler.generate(config, params, prompts, max_new_tokens=args.new, temperature=0,
                               eos_id=None, seed=0)  # fmt: skip
        return jax.block_until_ready(out.tokens)

    shape = dict(layers=args.layers, width=w, vocab=args.vocab, batch=args.batch,
                 prompt_len=args.prompt, new_tokens=args.new)  # fmt: skip
    return run, shape, args.new


def step_target(args):
    """A train step of bench_train.py at the variant's shapes."""
    import bench_train

    _, cfg, runs = bench_train.prepare(args.variant, args.overrides, (args.target,))
    r = runs[args.target]
    shape = dict(variant=args.variant or "builtin", d_model=cfg.d_model, layers=cfg.n_layers,
                 vocab=cfg.vocab_size, **r["shape"])  # fmt: skip
    return r["step"], shape, None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["sampler", "sft", "grpo", "opd"])
    ap.add_argument("--runs", type=int, default=2, help="traced runs (events are summed)")
    ap.add_argument("--top", type=int, default=25, help="groups printed (0: all)")
    ap.add_argument("--out", default=None, help="also append every JSON line to this file")
    ap.add_argument("--variant", default="", help="train steps: a paradigms.py variant")
    ap.add_argument("--overrides", default="", help="train steps: more model overrides")
    for name, default in (("layers", 4), ("width", 256), ("vocab", 4096), ("batch", 16),
                          ("prompt", 32), ("new", 128)):  # fmt: skip
        ap.add_argument(f"--{name}", type=int, default=default, help="sampler shape")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.top < 0:
        ap.error("--runs must be >= 1 and --top >= 0")

    import jax

    from jaxpost import metrics_log

    run, shape, steps = (sampler_target if args.target == "sampler" else step_target)(args)
    for _ in range(2):
        jax.block_until_ready(run())
    trace_dir = tempfile.mkdtemp(prefix="profile_ops_trace_")
    try:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(args.runs):
                jax.block_until_ready(run())
            wall = (time.perf_counter() - start) / args.runs
        rows, summary = op_table(*trace_events(trace_dir), args.runs, steps)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    common = {"target": args.target, **shape, "backend": jax.default_backend()}
    lines = [{"bench": "profile_ops", **common, **row} for row in rows[: args.top or None]]
    lines.append({"bench": "profile_ops_summary", **common,
                  "wall_ms_per_run": round(wall * 1e3, 3), **summary})  # fmt: skip
    for line in lines:
        metrics_log.print_json_line(line, args.out)


if __name__ == "__main__":
    main()
