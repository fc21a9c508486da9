"""The head-to-head: one base model, one budget, every paradigm, one report (the main job).

    from jaxpost import headtohead
    result = headtohead.run(config)   # experiments/configs/paradigms.py's ConfigDict

1. Models (`models`): the base student, SFT-trained on a narrow slice of the task's solutions
   plus the retention task, steering and privileged-context prompts, and a teacher (the base
   trained longer with all solutions, or a given checkpoint); cached by a key derived from the
   settings (`settings`).
2. Arms (`arms.ARMS`, one table): each starts from the base with the same budget.
3. Evaluation (`evaluation`) of base, teacher and every arm on held-out problems: pass@k and
   CoT-pass@k curves, coverage and support change, solution-set coverage, diversity, retention,
   steerability, state locality, rank bias, KL from the base, supervision efficiency, with
   bootstrap 95% CIs over problems.
4. Claims of the literature (`claims`) judged by paired CIs, and the report (`jaxpost.report`):
   report.md, metrics.json and plots (`protocol`).

Nothing here asks which task it runs: what differs between tasks is the task's protocol
(`task.sft_examples`, `privileged_view`, `diversity_key`, `steering`).
"""

from jaxpost.headtohead import claims
from jaxpost.headtohead.arm_runs import ARM_KEY_FILE
from jaxpost.headtohead.arms import ARMS, Arm, ArmContext
from jaxpost.headtohead.evaluation import Evaluation
from jaxpost.headtohead.protocol import RADAR_AXES, assemble, run
from jaxpost.headtohead.settings import arm_key, eval_key, model_key

__all__ = ["ARMS", "ARM_KEY_FILE", "RADAR_AXES", "Arm", "ArmContext", "Evaluation", "arm_key",
           "assemble", "claims", "eval_key", "model_key", "run"]
