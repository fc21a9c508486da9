"""The rotary table: the rotation a per-token evaluation computes, and loud outside its range."""

import jax.numpy as jnp
import numpy as np

from jaxpost import models
from jaxpost.models import rope


def _rotate(x, positions, inv_freq):  # the rotate-half formula in float64, cos/sin per token
    angles = positions[..., None].astype(np.float32) * inv_freq  # the float32 angle
    angles = np.concatenate([angles, angles], -1).astype(np.float64)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def test_the_table_holds_each_positions_rotation():
    config = models.get_config("tiny")
    inv_freq = rope.rope_inv_freq(config)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 3, config.head_dim)).astype(np.float32)
    positions = rng.integers(0, 200, (2, 7))
    rot = rope.rotation(rope.rope_table(inv_freq, 200), jnp.asarray(positions))
    got = rope.apply_rope(jnp.asarray(x), rot)
    np.testing.assert_allclose(np.asarray(got), _rotate(x, positions, inv_freq), atol=2e-5)


def test_a_position_outside_the_table_reads_nan():
    inv_freq = rope.rope_inv_freq(models.get_config("tiny"))
    x = jnp.ones((1, 3, 2, inv_freq.size * 2))
    rot = rope.rotation(rope.rope_table(inv_freq, 10), jnp.asarray([[0, 9, 10]]))
    got = np.asarray(rope.apply_rope(x, rot))
    assert np.isfinite(got[0, :2]).all() and np.isnan(got[0, 2]).all()
