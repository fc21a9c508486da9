"""The same steps on 1 device and on 8 simulated devices under several meshes agree."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import data, losses, models, sharding, train

pytestmark = pytest.mark.slow  # 8 simulated devices, 4 meshes x 3 steps compiled

CONFIG = models.get_config("tiny", vocab_size=64)
TEACHER = models.get_config("tiny", vocab_size=64, d_model=32, mlp_dim=64, n_layers=1)
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
OPTIM = train.OptimConfig(learning_rate=3e-3, warmup_steps=0)


def _rollout_batch(seed=0, N=8, P=6, M=5):
    rng = np.random.default_rng(seed)
    prompt_mask = np.ones((N, P), np.int32)
    prompt_mask[::2, :2] = 0  # left padding on some rows
    completion_mask = (np.arange(M)[None] < rng.integers(2, M + 1, N)[:, None]).astype(np.int32)
    return data.CompletionBatch(
        prompt_tokens=rng.integers(3, 64, (N, P)).astype(np.int32) * prompt_mask,
        prompt_mask=prompt_mask,
        completion=rng.integers(3, 64, (N, M)).astype(np.int32) * completion_mask,
        completion_mask=completion_mask,
        old_logp=-rng.uniform(2.0, 5.0, (N, M)).astype(np.float32) * completion_mask,
        advantages=rng.normal(size=N).astype(np.float32),
    )


def _sft_batch(seed=0, B=8, L=12):
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((B, L), np.int32)
    loss_mask[:, 4:] = 1
    return data.SequenceBatch(tokens=rng.integers(3, 64, (B, L)).astype(np.int32),
                              attention_mask=np.ones((B, L), np.int32), loss_mask=loss_mask)  # fmt: skip


def _setup(paradigm):
    if paradigm == "sft":
        return train.sft_objective(CONFIG), _sft_batch, ()
    if paradigm == "grpo":
        return train.grpo_objective(CONFIG, loss_type="grpo"), _rollout_batch, ()
    objective = train.opd_objective(CONFIG, TEACHER, losses.opd_kl(0.5))
    return objective, _rollout_batch, (models.init(TEACHER, seed=9),)


def _run(paradigm, mesh_shape):
    objective, make_batch, frozen = _setup(paradigm)
    optimizer = train.make_optimizer(OPTIM)
    step = train.make_step(objective, optimizer)
    state = train.init_state(models.init(CONFIG, seed=0), optimizer, seed=0)
    mesh = None
    if mesh_shape is None:
        jitted = train.jit_step(step)
    else:
        mesh = sharding.make_mesh(mesh_shape)
        state_sh = train.state_shardings(CONFIG, mesh, optimizer)
        batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), make_batch())
        frozen_sh = tuple(sharding.param_shardings(TEACHER, mesh) for _ in frozen)
        state = jax.device_put(state, state_sh)
        frozen = tuple(jax.device_put(f, s) for f, s in zip(frozen, frozen_sh))
        jitted = train.jit_step(
            step, state_sharding=state_sh, batch_sharding=batch_sh,
            frozen_sharding=frozen_sh,
        )  # fmt: skip
    losses_seen = []
    for i in range(3):
        # Built outside the mesh context: under `jax.set_mesh` a fresh array is committed
        # replicated, which the jitted step's batch sharding would refuse.
        batch = jax.tree.map(jnp.asarray, make_batch(seed=i))
        # Traced under the mesh, so the model's activation constraints apply (jaxpost.sharding).
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            state, metrics = jitted(state, batch, *frozen)
        losses_seen.append(float(metrics["loss"]))
    return state, losses_seen


@pytest.mark.parametrize("paradigm", ["sft", "grpo", "opd"])
def test_sharded_steps_match_one_device(paradigm):
    ref_state, ref_losses = _run(paradigm, None)
    for mesh_shape in MESHES:
        state, seen = _run(paradigm, mesh_shape)
        np.testing.assert_allclose(seen, ref_losses, rtol=1e-5)
        # Relative difference of the parameter vector, ||a - b|| / ||b|| over all parameters:
        # reductions split over shards sum in another order, and Adam's normalisation turns that
        # rounding into ~1e-7 noise on coordinates whose gradient is ~0 (a zero-initialised bias
        # moves by ±lr whatever the sign of a 1e-9 gradient), so element-wise rtol would measure
        # rounding, not agreement.
        a = np.concatenate([x.ravel() for x in jax.tree.leaves(jax.device_get(state.params))])
        b = np.concatenate([x.ravel() for x in jax.tree.leaves(jax.device_get(ref_state.params))])
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), mesh_shape
        # The parameters really are distributed as the rules say.
        embed = state.params["embed"]  # (vocab -> tensor, embed -> fsdp)
        d, f, t = mesh_shape
        assert embed.sharding.shard_shape(embed.shape) == (64 // t, 64 // f)
        q = state.params["layers"]["attn"]["q"]  # (layers, embed, heads, head_dim)
        assert q.sharding.shard_shape(q.shape) == (CONFIG.n_layers, 64 // f, 4 // t, 16)
        mu = state.opt_state[1][0].mu["layers"]["mlp"]["gate"]
        assert mu.sharding == state.params["layers"]["mlp"]["gate"].sharding
