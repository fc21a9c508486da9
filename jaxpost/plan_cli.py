"""The command line of the memory planner, `python -m jaxpost.plan` (`jaxpost.plan.main`).

    python -m jaxpost.plan --model=qwen2.5-0.5b --mesh=1,8,1 --objective=grpo \\
        --loss_impl=auto --batch=64 --prompt_len=256 --completion_len=1024 --remat=full \\
        --device_memory_gb=80 --platform=gpu

prints the plan's table and one JSON line; exit status 0 when it fits, 1 when it does not (the
message names the biggest term and the knob that shrinks it), 2 on bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from jaxpost import models, plan_step, train
from jaxpost.errors import UserError
from jaxpost.models import ModelConfig
from jaxpost.models.configs import REMAT
from jaxpost.plan_terms import PLATFORMS, GiB


def _load_config(name: str, dtype: str | None = None) -> ModelConfig:
    """A preset name or a local Hugging Face directory (only its config.json is read)."""
    if name in models.PRESETS:
        config = models.get_config(name)
        return config if dtype is None else config.replace(dtype=dtype, param_dtype=dtype)
    import os

    if os.path.isdir(name):
        from jaxpost.models import hf

        return hf.read_config(name, dtype)
    raise UserError(
        f"--model {name!r} is neither a preset ({sorted(models.PRESETS)}) nor a local directory"
    )


def _parse_args(argv: Sequence[str]):
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m jaxpost.plan",
        description="Per-device memory plan of a jaxpost training run (nothing is compiled).",
    )
    p.add_argument("--model", required=True, help="preset name or local HF checkpoint dir")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor or e.g. fsdp=8,tensor=2")
    p.add_argument("--devices", type=int, default=None,
                   help="device count the mesh must multiply to (default: the mesh's product; "
                   "needed to fill a -1)")  # fmt: skip
    p.add_argument("--batch", type=int, required=True,
                   help="global rows per step (sft: sequences; grpo/opd: prompts x group_size)")  # fmt: skip
    p.add_argument("--objective", default="sft", choices=plan_step.OBJECTIVES)
    p.add_argument("--loss_impl", default="auto", choices=train.LOSS_IMPLS,
                   help="the loss path (auto: fused_linear at a large vocabulary)")  # fmt: skip
    p.add_argument("--seq_len", type=int, default=None, help="sft: tokens per sequence")
    p.add_argument("--prompt_len", type=int, default=None, help="grpo/opd: padded prompt width")
    p.add_argument("--completion_len", type=int, default=None,
                   help="grpo/opd: completion width (max_new_tokens)")  # fmt: skip
    p.add_argument("--teacher", default=None, help="opd: preset or HF dir of the teacher")
    p.add_argument("--teacher_prompt_len", type=int, default=None,
                   help="opd: the teacher's (privileged) prompt width (default: prompt_len)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=1.0,
                   help="opd: D_alpha of opd_kl (0 forward KL, 1 reverse KL, between JSD)")  # fmt: skip
    p.add_argument("--entropy_aware", action="store_true", help="opd: entropy_aware_opd_kl")
    p.add_argument("--with_reference", action="store_true", help="grpo: a frozen reference")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--remat", default=None, choices=REMAT)
    p.add_argument("--platform", default=None, choices=PLATFORMS,
                   help="where the run will compile (default: this machine's backend)")  # fmt: skip
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default: the model's)")  # fmt: skip
    p.add_argument("--param_dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--sample_batch", type=int, default=None, help="rows the sampler decodes")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lora_rank", type=int, default=0, help="> 0: train LoRA adapters of this rank")
    p.add_argument("--device_memory_gb", type=float, default=None, help="GiB per device")
    return p.parse_args(argv)


def main(argv: Sequence[str], plan: Callable) -> int:
    """Print the plan's table and JSON line; 0 when it fits, 1 when not, 2 on bad input.
    `plan` is `jaxpost.plan.plan` (passed in: that module runs this one)."""
    args = _parse_args(argv)
    try:
        config = _load_config(args.model)
        changes = {k: getattr(args, k) for k in ("dtype", "param_dtype") if getattr(args, k)}
        config = config.replace(**changes)
        teacher = None if args.teacher is None else _load_config(args.teacher)
        memory = None if args.device_memory_gb is None else int(args.device_memory_gb * GiB)
        distill = None
        if args.objective == "opd":
            from jaxpost import losses

            distill = (losses.entropy_aware_opd_kl() if args.entropy_aware
                       else losses.opd_kl(args.alpha))  # fmt: skip
        p = plan(
            config, args.mesh, batch=args.batch, seq_len=args.seq_len, objective=args.objective,
            loss_impl=args.loss_impl, prompt_len=args.prompt_len,
            completion_len=args.completion_len, teacher_config=teacher,
            teacher_prompt_len=args.teacher_prompt_len, with_reference=args.with_reference,
            distill_loss=distill, optimizer=args.optimizer, remat=args.remat,
            sample_batch=args.sample_batch, device_memory_bytes=memory, devices=args.devices,
            grad_accum=args.grad_accum, platform=args.platform, lora_rank=args.lora_rank,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(p.table())
    print(p.to_json())
    if not p.fits:
        print(f"error: {p.message}", file=sys.stderr)
        return 1
    return 0
