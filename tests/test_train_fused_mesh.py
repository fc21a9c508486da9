"""The fused-linear objectives on a mesh with sharded state, and their compiled memory.

Under a mesh the LM head is sharded (vocab over tensor, embed over fsdp); the fused ops slice it
by vocabulary blocks and XLA's partitioner gathers the vocabulary axis for that. Values and
gradients must still equal the one-device materialized ones. Memory: the fused objective's
value-and-grad holds no vocabulary-sized temporary at all, and the whole step only
parameter-sized ones (the [V, D] gradients and optimizer update), far below materialized logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_fused import completion_batch, sft_batch

from jaxpost import data, losses, models, sharding, train

pytestmark = pytest.mark.slow  # steps compiled on 8 simulated devices

V = 5000  # two vocabulary blocks of 4096 (the last overlapping), divisible by tensor = 2, 4, 8
STUDENT = models.get_config("tiny", vocab_size=V, d_model=32, n_layers=1, mlp_dim=64)
TEACHER = models.ModelConfig(family="llama", vocab_size=V, d_model=32, n_layers=1, n_heads=4,
                             n_kv_heads=2, head_dim=8, mlp_dim=64, tie_embeddings=False)  # fmt: skip


def _setup(paradigm, impl):
    """(objective, batch, frozen params, frozen config)."""
    if paradigm == "sft":
        return train.sft_objective(STUDENT, impl), sft_batch(V, B=8), (), ()
    if paradigm == "grpo":
        objective = train.grpo_objective(STUDENT, loss_impl=impl, with_reference=True,
                                         kl_beta=0.1)  # fmt: skip
        return objective, completion_batch(V, N=8), (models.init(STUDENT, seed=7),), (STUDENT,)
    objective = train.opd_objective(STUDENT, TEACHER, losses.entropy_aware_opd_kl(), impl)
    batch = completion_batch(V, N=8, teacher_width=9)  # OPSD: a wider, privileged teacher view
    return objective, batch, (models.init(TEACHER, seed=9),), (TEACHER,)


MESHES = [(2, 2, 2), (1, 8, 1), pytest.param((1, 2, 4), marks=pytest.mark.slow)]


@pytest.mark.parametrize("mesh_shape", MESHES)
@pytest.mark.parametrize("paradigm", ["sft", "grpo", "opd"])
def test_fused_step_on_a_mesh_equals_materialized_on_one_device(paradigm, mesh_shape):
    """One step with plain SGD, so the parameter update is the gradient itself: the fused step on
    sharded state moves every parameter as the one-device materialized step does."""
    objective, batch, frozen, frozen_configs = _setup(paradigm, "materialized")
    fused, *_ = _setup(paradigm, "fused_linear")
    optimizer = optax.sgd(1.0)
    state = train.init_state(models.init(STUDENT, seed=0), optimizer)
    want, want_metrics = jax.jit(train.make_step(objective, optimizer))(state, batch, *frozen)
    start = jax.device_get(state.params)  # (the sharded step donates what device_put may share)

    mesh = sharding.make_mesh(mesh_shape)
    state_sh = train.state_shardings(STUDENT, mesh, optimizer)
    batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)
    frozen_sh = tuple(sharding.param_shardings(c, mesh) for c in frozen_configs)
    step = train.jit_step(train.make_step(fused, optimizer), state_sharding=state_sh,
                          batch_sharding=batch_sh, frozen_sharding=frozen_sh)  # fmt: skip
    args = (jax.device_put(state, state_sh), jax.device_put(batch, batch_sh),
            *(jax.device_put(f, sh) for f, sh in zip(frozen, frozen_sh)))  # fmt: skip
    with jax.set_mesh(mesh):
        got, metrics = step(*args)
    assert set(metrics) == set(want_metrics) and int(metrics["finite"]) == 1
    for key in want_metrics:  # loss, grad_norm and the objective's scalar aux
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-6)
    moved = lambda new: jax.tree.map(np.subtract, jax.device_get(new), start)  # noqa: E731
    eps = np.finfo(np.float32).eps  # new − start carries the parameters' own rounding
    for (path, a), b, p in zip(jax.tree_util.tree_leaves_with_path(moved(got.params)),
                               jax.tree.leaves(moved(want.params)), jax.tree.leaves(start)):  # fmt: skip
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + 2 * eps * np.linalg.norm(p), path
    assert got.params["embed"].sharding == state_sh.params["embed"]


# ---------------------------------------------------------------------------------------------
# compiled memory at small shapes (abstract inputs: nothing is allocated)

ROWS, PROMPT, COMPLETION, WIDTH = 8, 8, 128, 32  # 1024 head rows; D = 32
SMALL_V, LARGE_V = 8192, 32768


def _abstract(paradigm, impl, vocab):
    s = jax.ShapeDtypeStruct
    config = models.get_config("tiny", vocab_size=vocab, d_model=WIDTH, n_layers=1, mlp_dim=64)
    params = models.abstract_params(config)
    if paradigm == "sft":
        tokens = s((ROWS, COMPLETION + 1), jnp.int32)
        return config, train.sft_objective(config, impl), data.SequenceBatch(*[tokens] * 3), ()
    ints = lambda n: s((ROWS, n), jnp.int32)  # noqa: E731
    batch = data.CompletionBatch(ints(PROMPT), ints(PROMPT), ints(COMPLETION), ints(COMPLETION),
                                 old_logp=s((ROWS, COMPLETION), jnp.float32),
                                 advantages=s((ROWS,), jnp.float32))  # fmt: skip
    if paradigm == "grpo":
        objective = train.grpo_objective(config, loss_impl=impl, with_reference=True, kl_beta=0.1)
    else:
        objective = train.opd_objective(config, config, losses.opd_kl(1.0), impl)
    return config, objective, batch, (params,)


def _temp_bytes(paradigm, impl, vocab, whole_step):
    config, objective, batch, frozen = _abstract(paradigm, impl, vocab)
    params = models.abstract_params(config)
    if whole_step:
        optimizer = train.make_optimizer(train.OptimConfig())
        state = jax.eval_shape(lambda p: train.init_state(p, optimizer), params)
        lowered = train.jit_step(train.make_step(objective, optimizer)).lower(state, batch, *frozen)
    else:
        lowered = jax.jit(jax.value_and_grad(objective, has_aux=True)).lower(params, batch, *frozen)
    return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("paradigm", ["sft", "grpo", "opd"])
def test_fused_value_and_grad_holds_no_vocabulary_sized_temporary(paradigm):
    """The objective's value-and-grad (gradients are outputs): at 4x the V at most a few bytes
    more per vocabulary entry (the embedding gradient's [V] index vectors, models/embedding.py;
    no row of D values, let alone an [N, V] array), against the materialized logits' several
    [N, V] float32 arrays."""
    small, large = (_temp_bytes(paradigm, "fused_linear", v, False) for v in (SMALL_V, LARGE_V))
    assert large - small <= 16 * (LARGE_V - SMALL_V)
    assert large <= 0.2 * _temp_bytes(paradigm, "materialized", LARGE_V, False)


@pytest.mark.slow
@pytest.mark.parametrize("paradigm", ["sft", "grpo", "opd"])
def test_fused_step_temp_memory_grows_only_by_parameter_sized_buffers(paradigm):
    """The whole step (AdamW, skip logic): per vocabulary entry at most two float32 [D] rows
    (the tied table's embedding gradient and head gradient live together), while materialized
    logits add 4 bytes per row several times over."""
    small, large = (_temp_bytes(paradigm, "fused_linear", v, True) for v in (SMALL_V, LARGE_V))
    per_entry = (large - small) / (LARGE_V - SMALL_V)
    assert per_entry <= 2 * 4 * WIDTH, per_entry
    assert large <= 0.2 * _temp_bytes(paradigm, "materialized", LARGE_V, True)
