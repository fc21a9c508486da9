"""Sampler throughput: jaxpost's jitted KV-cached decode against transformers' `generate`.

    python scripts/bench_sampler.py [--layers 4 --width 256 --batch 16 --prompt 32 --new 128]

Both run the same random Qwen2-style checkpoint (built with transformers, loaded into jaxpost with
`load_hf`), greedy, with a KV cache, on the same machine; the runs alternate so drift in machine
load hits both. One JSON line per measurement, then a summary line holding
`speedup_vs_transformers` (ratio of decode tokens/s). jaxpost's compilation is timed separately
and excluded from its tokens/s; both numbers include the prefill of the prompts.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    import transformers

    from jaxpost import sampler
    from jaxpost.models import hf

    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
        num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
        num_key_value_heads=max(1, args.width // 128), max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    path = tempfile.mkdtemp(prefix="bench_sampler_")
    torch_model.save_pretrained(path, safe_serialization=True)
    config, params = hf.load_hf(path)

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, args.vocab, (args.batch, args.prompt))
    new_tokens = args.batch * args.new
    common = dict(
        layers=args.layers, width=args.width, vocab=args.vocab, batch=args.batch,
        prompt_len=args.prompt, new_tokens=args.new, backend=jax.default_backend(),
        torch_threads=torch.get_num_threads(),
    )  # fmt: skip

    def run_jax() -> float:
        start = time.perf_counter()
        out = sampler.generate(
            config, params, prompts.tolist(), max_new_tokens=args.new, temperature=0,
            eos_id=None, seed=0,
        )  # fmt: skip
        jax.block_until_ready(out.tokens)
        assert int(out.lengths.min()) == args.new
        return time.perf_counter() - start

    def run_torch() -> float:
        ids = torch.tensor(prompts)
        start = time.perf_counter()
        with torch.no_grad():
            out = torch_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                min_new_tokens=args.new, do_sample=False, use_cache=True, pad_token_id=0,
            )  # fmt: skip
        assert out.shape[1] == args.prompt + args.new
        return time.perf_counter() - start

    first = run_jax()
    run_torch()  # warm-up of torch's kernels and caches
    jax_times, torch_times = [], []
    for _ in range(args.repeats):
        jax_times.append(run_jax())
        torch_times.append(run_torch())
    compile_s = first - min(jax_times)

    for name, times in (("jaxpost", jax_times), ("transformers", torch_times)):
        for i, t in enumerate(times):
            line = {"bench": "sampler", "impl": name, "repeat": i, "seconds": round(t, 4),
                    "decode_tokens_per_s": round(new_tokens / t, 1), **common}  # fmt: skip
            print(json.dumps(line))
    jax_tps = new_tokens / statistics.median(jax_times)
    torch_tps = new_tokens / statistics.median(torch_times)
    print(
        json.dumps(
            {
                "bench": "sampler_summary",
                "jaxpost_tokens_per_s": round(jax_tps, 1),
                "transformers_tokens_per_s": round(torch_tps, 1),
                "jaxpost_compile_s": round(compile_s, 2),
                "speedup_vs_transformers": round(jax_tps / torch_tps, 2),
                **common,
            }  # fmt: skip
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
