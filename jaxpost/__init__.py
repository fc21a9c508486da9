"""jaxpost: post-training language models with SFT, RL and on-policy distillation in JAX.

Import the parts you need: ``jaxpost.models``, ``jaxpost.losses``, ``jaxpost.sampler``,
``jaxpost.tasks``, ``jaxpost.metrics``, ``jaxpost.train``. Bad input a user can fix raises
``jaxpost.UserError`` everywhere; a run that diverged raises ``jaxpost.Diverged`` (a UserError)
and one stopped by SIGTERM ``jaxpost.Preempted`` (``jaxpost.errors`` lists the exit statuses).
"""

from jaxpost.errors import Diverged, Preempted, UserError

__version__ = "0.1.0"
__all__ = ["Diverged", "Preempted", "UserError"]
