"""On-policy distillation (OPD) and self-distillation (OPSD) on Countdown.

    python -m experiments.sft --config=experiments/configs/sft.py --workdir=/tmp/jaxpost_sft
    python -m experiments.opd --config=experiments/configs/opd.py --workdir=/tmp/jaxpost_opd \\
        --teacher=/tmp/jaxpost_sft/model
    python -m experiments.opd --config=experiments/configs/opd.py --workdir=/tmp/jaxpost_opsd \\
        --config.mode=opsd --init=/tmp/jaxpost_opd/sft_init/model

The student samples completions of training prompts; the teacher scores every token of them with
its full next-token distribution, and the student minimises the generalized JSD D_alpha
(`--config.alpha`: 0 forward KL, 1 reverse KL, between the interpolation of jaxpost.opd).

mode "opd": the teacher is `--teacher=DIR` (a Hugging Face directory with the student's tokenizer,
e.g. WORKDIR/model of experiments.sft), or, without one, a model trained here with `teacher_sft`
(the SFT stage of experiments/configs/sft.py, 300 steps) into WORKDIR/teacher.
mode "opsd": the teacher is the frozen starting student shown a reference solution before the
prompt ("ref <solution>\\n" + prompt, countdown.privileged_view). A tiny model only uses such a
reference if it has seen some, so the built-in student SFT (`sft`, 200 steps: weaker than the
teacher's 300) puts the solution in the prompt of a quarter of its examples
(sft.data.privileged_fraction); evaluation always uses the plain prompt.
The student is `--init=DIR` (or `--model=DIR`), else that built-in SFT into WORKDIR/sft_init.
Both built-in stages are reused from their directories when the command is rerun.

Prints the student and teacher, a progress bar (loss, rollout pass rate, ...), then the held-out
evaluation of the starting student, the teacher (for OPSD: with the reference solution in its
prompt) and the distilled student (pass@1 and pass@64 with 95% bootstrap intervals, CoT-pass@1,
coverage, distinct correct solutions per problem), the wall time and WORKDIR/model, the distilled
student as a Hugging Face directory; WORKDIR/eval.json has the full pass@k curves.

Measured on a 2-core CPU shared with other jobs (load average 3-4), defaults, the three commands
above (the first is experiments.sft's, see its config), 64 held-out problems x 64 samples:

OPD, reverse KL (alpha 1), student = the built-in 200-step SFT (trained in the run: 176 s),
teacher = experiments.sft's model; 337 s wall in all (100 OPD steps: 104 s):

    model      task       pass@1                pass@64                cot_pass@1  coverage  distinct
    start      countdown  0.031 [0.021,0.043]   0.625 [0.500,0.734]         0.002     0.625      1.00
    teacher    countdown  0.206 [0.164,0.249]   0.906 [0.844,0.969]         0.043     0.906      2.08
    after OPD  countdown  0.081 [0.057,0.105]   0.672 [0.562,0.781]         0.009     0.672      1.16

OPSD from the same student (reused with --init); 169 s wall (100 steps: 105 s). The privileged
teacher is far better than the student, yet distilling it did not help here:

    model                 task       pass@1                pass@64                cot_pass@1  coverage
    start                 countdown  0.031 [0.021,0.043]   0.625 [0.500,0.734]         0.002     0.625
    teacher (privileged)  countdown  0.183 [0.142,0.230]   0.719 [0.609,0.828]         0.007     0.719
    after OPSD            countdown  0.022 [0.014,0.030]   0.547 [0.422,0.656]         0.000     0.547

Without --teacher the run first trains the teacher too (`teacher_sft`, the same 300-step SFT as
experiments.sft, whose measured run took 237 s in all). Variants: `--config.alpha=0` (forward KL),
`--config.alpha=0.5` (JSD), `--config.loss=entropy_aware`, `--config.prefix_len=8`.
"""

import ml_collections

from experiments import configs


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "opd"  # "opd": a separate teacher; "opsd": the frozen student with privileged context
    c.init = ""  # the student, a HF directory; "" trains one with `sft` into WORKDIR/sft_init
    c.teacher = ""  # mode opd: the teacher, a HF dir; "" trains one with `teacher_sft`
    c.tokenizer = "auto"  # "auto": the directory's own (see experiments/common.py), "char", a dir
    c.dtype = ""  # "" keeps the checkpoints' dtype
    c.sft = configs.sft_stage(steps=200)  # the built-in student: a shorter SFT than the teacher's
    c.sft.data.privileged_fraction = 0.25  # so the frozen student can read a reference (OPSD)
    c.teacher_sft = configs.sft_stage(steps=300)  # the built-in teacher (mode opd)
    c.task = configs.countdown()
    c.train_problems = 1500  # prompt pool: Countdown train problems (the SFT stages', same seed)

    c.alpha = 1.0  # divergence: 0 forward KL(teacher || student), 1 reverse KL, between: JSD
    c.loss = "kl"  # "kl": opd_kl(alpha); "entropy_aware": reverse/forward KL mix by teacher entropy
    c.distill_temperature = 1.0  # both models' logits are divided by it inside the loss
    c.prefix_len = 0  # > 0: distil only the first prefix_len tokens of each completion
    c.loss_impl = ""  # "": dense jnp; a kernels implementation name for the fused kernel

    # Measured from the built-in student (100 OPD steps, 32 problems x 16 samples): pass@1 0.021
    # -> 0.098 at 3e-4, -> 0.115 at 1e-3; a 100-step SFT student stayed at ~0 from 1e-4 to 3e-3.
    c.optim = configs.optimizer(learning_rate=3e-4, warmup_steps=10)

    c.loop = ml_collections.ConfigDict()
    c.loop.steps = 100  # updates, one rollout batch each
    c.loop.batch_size = 16  # prompts per update
    c.loop.group_size = 4  # student samples per prompt
    c.loop.max_new_tokens = 32
    c.loop.temperature = 1.0  # the student's sampling temperature
    c.loop.checkpoint_every = 50
    c.loop.log_every = 5
    c.loop.progress = True

    c.eval = configs.evaluation()
    c.eval.teacher = True  # also evaluate the teacher (OPSD: with its reference solution)
    c.workdir = "/tmp/jaxpost_opd"  # sft_init/, teacher/, metrics.jsonl, checkpoints/, model/
    c.seed = 0
    return c
