"""The step loop around a jitted step (`jaxpost.runner`): where a resumed loop picks up."""

import numpy as np
import optax

from jaxpost import checkpoint, loops, runner, train


def test_resume_counts_loop_steps_not_optimizer_updates(tmp_path):
    """An on-policy step may make several updates (num_iterations): the checkpoint of loop step
    2 holds a state at update 4, and the resumed loop runs step 3 next, not step 5."""
    state = train.init_state({"w": np.ones(3, np.float32)}, optax.sgd(0.1), seed=0)
    saver = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    saver.save(2, state.replace(step=state.step + 4), force=True)
    saver.wait()
    saver.close()
    loop = loops.LoopConfig(steps=3, batch_size=1, workdir=str(tmp_path), progress=False)
    run = runner.Runner(loop, state)
    assert run.start == 2 and int(run.state.step) == 4
    seen = []
    result = run.iterate(lambda step: (seen.append(step), ({}, {}))[1])
    assert seen == [3] and [row["step"] for row in result.history] == [3]
