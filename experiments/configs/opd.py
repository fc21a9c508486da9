"""On-policy distillation (OPD) and self-distillation (OPSD); evaluated before and after.

    python -m experiments.sft --workdir=/tmp/jaxpost_sft
    python -m experiments.opd --workdir=/tmp/jaxpost_opd --teacher=/tmp/jaxpost_sft/model
    python -m experiments.opd --workdir=/tmp/jaxpost_opsd --config.mode=opsd
    python -m experiments.opd --config=experiments/configs/opd.py:tiny --workdir=/tmp/opd_tiny

The student samples completions of training prompts; the teacher scores every token of them with
its full next-token distribution, and the student minimises the generalized JSD D_alpha
(`--config.alpha`: 0 forward KL, 1 reverse KL, between the interpolation of jaxpost.opd).

mode "opd": the teacher is `--teacher=DIR` (a Hugging Face directory with the student's tokenizer,
e.g. WORKDIR/model of experiments.sft), or, without one, a model trained here with `teacher_sft`
(the SFT stage of experiments/configs/sft.py, 300 steps) into WORKDIR/teacher.
mode "opsd": the teacher is the frozen starting student shown a reference solution before the
prompt (`task.privileged_view`). A tiny model only uses such a reference if it has seen some, so
the built-in student SFT (`sft`, 200 steps: weaker than the teacher's 300) adds prompts with the
solution in context (sft.data.privileged_share); evaluation always uses the plain prompt.
The student is `--model=DIR`, or a preset SFT-trained here with `sft` into WORKDIR/sft_init.
Both built-in stages are reused from their directories when the command is rerun.

Prints the processes and devices, the student and teacher, a progress bar (loss, rollout pass
rate, ...), then the held-out evaluation of the starting student, the teacher (for OPSD: with the
reference solution in its prompt) and the distilled student (pass@1 and pass@64 with 95%
bootstrap intervals, CoT-pass@1, coverage, distinct correct solutions per problem), the wall time
and WORKDIR/model, the distilled student as a Hugging Face directory.

Measured on the project's 2-core CPU (AMD EPYC Zen 5, otherwise idle, XLA:CPU, 2026-12-06,
8e0c626), defaults, 64 held-out problems x 64 samples; the README's commands as printed (the
OPSD one without --model, so it trains its own student, the same one):

OPD, reverse KL (alpha 1), student = the built-in 200-step SFT (trained in the run: 33 s),
teacher = experiments.sft's model; 72 s for the command (100 OPD steps: 21 s):

    model      task       pass@1                pass@64                cot_pass@1  coverage  distinct
    start      countdown  0.030 [0.020,0.041]   0.625 [0.500,0.734]         0.001     0.625      0.92
    teacher    countdown  0.206 [0.165,0.250]   0.891 [0.812,0.953]         0.051     0.891      2.03
    after OPD  countdown  0.056 [0.039,0.075]   0.641 [0.531,0.750]         0.003     0.641      1.00

OPSD from the same student (75 s): the privileged teacher (pass@1 0.157) is far better than the
student, yet distilling it did not help here (0.030 -> 0.020; rollout pass rate 0.028 -> 0.022).
(An earlier tree on the Zen 3 CPU, 2026-12-02: OPD 0.030 -> 0.051 in 159 s, OPSD 0.030 -> 0.020
in 167 s.)

Variants: "tiny" (seconds), "pretrained" (checkpoints given with --model and --teacher: bfloat16,
lr 1e-6, 256 new tokens). Overrides: `--config.alpha=0` (forward KL), `--config.alpha=0.5` (JSD),
`--config.loss=entropy_aware`, `--config.prefix_len=8`, `--config.loss=sampled` (sampled-token
OPD: one teacher logprob per token; `--config.sampled_with_reward=true` adds the task reward),
`--config.teacher_topk=64` (a top-k teacher: k + 1 numbers a token instead of the vocabulary;
with it `--teacher=A,B` distils from several teachers, each on its interleaved share of the
prompts, `--config.teacher_devices=4` puts them on their own devices, `--config.teacher_cache_rows`
reuses their scores, and a teacher of another tokenizer is distilled on aligned text),
`--config.mode=opsd --config.self_teacher=ema` (OPSD's teacher an EMA of the live policy),
`--config.mode=opsd --config.privileged=feedback` (the teacher sees the verifier's message on the
student's own attempt instead of a reference solution).
"""

from experiments import configs


def get_config(arg: str | None = None):
    c = configs.shared()
    c.mode = "opd"  # "opd": a separate teacher; "opsd": the frozen student with privileged context
    c.sft = configs.sft_stage(steps=200)  # the built-in student: a shorter SFT than the teacher's
    c.sft.data.privileged_share = 0.25  # so the frozen student can read a reference (OPSD)
    c.teacher_sft = configs.sft_stage(steps=300)  # the built-in teacher (mode opd, no --teacher)
    c.train_problems = 1500  # prompt pool: the task's train problems (the SFT stages', same seed)

    c.alpha = 1.0  # divergence: 0 forward KL(teacher || student), 1 reverse KL, between: JSD
    c.loss = "kl"  # "kl": opd_kl(alpha); "entropy_aware": reverse/forward KL mix by teacher entropy;
    # "sampled": sampled-token OPD as RL (the tinker recipe): the teacher scores only the sampled
    # token, advantage sampled_coef * (log p_T - log p_S) in GRPO's clipped loss
    c.sampled_coef = 1.0
    # > 0: a top-k teacher (jaxpost.teachers): its k most likely ids per token, their logprobs and
    # a tail bucket, scored once per batch by the teacher's own program; loss "kl" only
    c.teacher_topk = 0
    # top-k teachers only (jaxpost.teacher_service): > 0 puts the teachers on the last
    # teacher_devices devices (FSDP) and the student's --mesh on the others (one process);
    # > 0 keeps that many rows' teacher scores for reuse (identical rollouts are not rescored)
    c.teacher_devices = 0
    c.teacher_cache_rows = 0
    # mode opsd: the self-teacher: "frozen" (the starting student), "live" (the current policy),
    # "ema" (a moving average of it, decay ema_decay; jaxpost.teachers)
    c.self_teacher = "frozen"
    c.ema_decay = 0.99
    # mode opsd: the teacher's privileged context: "solution" (a reference solution) or
    # "feedback" (the verifier's message on the row's own attempt, tasks.feedback)
    c.privileged = "solution"
    c.sampled_with_reward = False  # "sampled": add the verifier's group advantage (GRPO + OPD)
    c.distill_temperature = 1.0  # both models' logits are divided by it inside the loss
    c.prefix_len = 0  # > 0: distil only the first prefix_len tokens of each completion

    # Measured from the built-in student (100 OPD steps, 32 problems x 16 samples): pass@1 0.021
    # -> 0.098 at 3e-4, -> 0.115 at 1e-3; a 100-step SFT student stayed at ~0 from 1e-4 to 3e-3.
    c.optim = configs.optimizer(learning_rate=3e-4, warmup_steps=10)
    c.loop = configs.loop(steps=100, batch_size=16, checkpoint_every=50, log_every=5)
    c.sampling = configs.sampling(group_size=4)
    c.eval = configs.evaluation()
    c.eval.teacher = True  # also evaluate the teacher (OPSD: with its reference solution)
    return configs.with_variant(c, arg, {"tiny": _tiny, "pretrained": _pretrained})


def _tiny(c) -> None:
    c.model = "tiny"
    configs.tiny_stage(c.sft)
    configs.tiny_stage(c.teacher_sft, steps=16)
    c.train_problems = 48
    c.optim.warmup_steps = 1
    c.loop.steps, c.loop.batch_size, c.loop.checkpoint_every, c.loop.log_every = 3, 4, 0, 1
    c.loop.progress = False
    c.sampling.group_size = 2
    configs.tiny_eval(c.eval)


def _pretrained(c) -> None:
    c.model = ""  # required: --model=DIR (and --teacher=DIR for mode opd)
    c.dtype = "bfloat16"
    c.optim.learning_rate, c.optim.warmup_steps = 1e-6, 5
    c.loop.steps, c.loop.batch_size, c.loop.checkpoint_every = 100, 8, 25
    c.sampling.max_new_tokens = 256
    configs.pretrained_eval(c.eval)
