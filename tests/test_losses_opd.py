"""On-policy distillation losses against float64 NumPy references; limits, padding, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_losses_refs as ref

from jaxpost import losses

ALPHAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TOL = {jnp.float32: dict(rtol=2e-5, atol=1e-6), jnp.bfloat16: dict(rtol=2e-5, atol=1e-6)}


def _logits(rng, b=3, l=5, v=17, scale=2.0):
    student = rng.normal(size=(b, l, v)) * scale
    teacher = student + rng.normal(size=(b, l, v)) * scale  # related, not identical
    lengths = rng.integers(1, l + 1, size=b)
    lengths[0] = l
    mask = (np.arange(l)[None, :] < lengths[:, None]).astype(np.float32)
    return student, teacher, mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_opd_kl_matches_reference(alpha, temperature, dtype):
    rng = np.random.default_rng(10)
    student, teacher, mask = _logits(rng)
    # The reference sees exactly the values the loss sees (bf16 inputs are rounded first).
    student, teacher = (jnp.asarray(x, dtype) for x in (student, teacher))
    loss, aux = losses.opd_kl(alpha, temperature=temperature)(student, teacher, jnp.asarray(mask))
    per_token = ref.generalized_jsd(
        np.asarray(student, np.float64), np.asarray(teacher, np.float64), alpha, temperature
    )
    np.testing.assert_allclose(loss, ref.masked_mean(per_token, mask), **TOL[dtype])
    np.testing.assert_allclose(aux["divergence_max"], per_token[mask > 0].max(), **TOL[dtype])
    assert aux["num_tokens"] == mask.sum()


@pytest.mark.parametrize("alpha", ALPHAS)
def test_divergence_of_identical_logits_is_zero(alpha):
    rng = np.random.default_rng(11)
    logits, _, mask = _logits(rng, scale=5.0)
    logits[..., :3] = -np.inf  # a shared masked-out vocabulary slice
    logits = jnp.asarray(logits, jnp.float32)
    loss, _ = losses.opd_kl(alpha, temperature=0.8)(logits, logits, jnp.asarray(mask))
    np.testing.assert_allclose(loss, 0.0, atol=2e-6)


def test_alpha_limits():
    """D_α / α → KL(p_T ‖ p_S) as α → 0 and D_α / (1 − α) → KL(p_S ‖ p_T) as α → 1."""
    rng = np.random.default_rng(12)
    student, teacher, mask = _logits(rng, scale=1.0)
    with jax.enable_x64(True):
        s, t, m = (jnp.asarray(x, jnp.float64) for x in (student, teacher, mask))
        loss = lambda a: losses.opd_kl(a)(s, t, m)[0]
        forward, reverse, small = loss(0.0), loss(1.0), 1e-5
        np.testing.assert_allclose(loss(small) / small, forward, rtol=1e-3)
        np.testing.assert_allclose(loss(1 - small) / small, reverse, rtol=1e-3)
        p_s, p_t = ref.softmax(student), ref.softmax(teacher)
        np.testing.assert_allclose(forward, ref.masked_mean(ref.kl(p_t, p_s), mask), rtol=1e-12)
        np.testing.assert_allclose(reverse, ref.masked_mean(ref.kl(p_s, p_t), mask), rtol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_opd_kl_gradient_matches_finite_differences(alpha):
    rng = np.random.default_rng(13)
    student, teacher, _ = _logits(rng, b=2, l=2, v=6)
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0]])
    with jax.enable_x64(True):
        teacher = jnp.asarray(teacher)
        fn = lambda x: losses.opd_kl(alpha, temperature=0.7)(x, teacher, mask)[0]
        ref.assert_grad_matches_finite_differences(fn, student)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_opd_kl_ignores_padding_and_masked_vocab(alpha):
    rng = np.random.default_rng(14)
    student, teacher, mask = _logits(rng)
    student[..., -4:] = teacher[..., -4:] = -np.inf  # vocabulary padding, shared by both models
    pad = mask == 0
    dirty_s, dirty_t = student.copy(), teacher.copy()
    for x in (dirty_s, dirty_t):
        x[pad] = rng.choice([1e30, -1e30, np.inf, -np.inf, np.nan], size=(pad.sum(), x.shape[-1]))

    def value_and_grad(s, t):
        fn = lambda x: losses.opd_kl(alpha, temperature=1.5)(x, jnp.asarray(t), jnp.asarray(mask))
        return jax.value_and_grad(lambda x: fn(x)[0])(jnp.asarray(s, jnp.float32))

    loss, grad = value_and_grad(student, teacher)
    # the −inf entries are simply not part of either distribution
    expect = ref.generalized_jsd(student[..., :-4], teacher[..., :-4], alpha, 1.5)
    np.testing.assert_allclose(loss, ref.masked_mean(expect, mask), rtol=2e-5)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., -4:] == 0)
    dirty_loss, dirty_grad = value_and_grad(dirty_s, dirty_t)
    np.testing.assert_array_equal(dirty_loss, loss)
    np.testing.assert_array_equal(dirty_grad, grad)
    assert np.all(np.asarray(dirty_grad)[pad] == 0)


def test_teacher_gets_no_gradient():
    rng = np.random.default_rng(15)
    student, teacher, mask = (jnp.asarray(x, jnp.float32) for x in _logits(rng))
    grad = jax.grad(lambda t: losses.opd_kl(0.5)(student, t, mask)[0])(teacher)
    assert np.all(np.asarray(grad) == 0)


def test_opd_kl_is_jittable_and_matches_eager():
    rng = np.random.default_rng(16)
    student, teacher, mask = (jnp.asarray(x, jnp.float32) for x in _logits(rng))
    fn = losses.opd_kl(0.5, temperature=0.9)
    np.testing.assert_allclose(
        jax.jit(fn)(student, teacher, mask)[0], fn(student, teacher, mask)[0], rtol=1e-6
    )


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan"), "0.5", True])
def test_opd_kl_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        losses.opd_kl(alpha)


def test_opd_rejects_vocabulary_mismatch_and_bad_shapes():
    student, mask = jnp.zeros((2, 3, 8)), jnp.ones((2, 3))
    for loss_fn in (
        losses.opd_kl(0.5),
        losses.opd_kl(1.0, impl="xla"),
        losses.entropy_aware_opd_kl(),
    ):
        with pytest.raises(ValueError, match="vocabularies differ"):
            loss_fn(student, jnp.zeros((2, 3, 9)), mask)
        with pytest.raises(ValueError, match="same"):
            loss_fn(student, jnp.zeros((2, 4, 8)), mask)
        with pytest.raises(ValueError, match="mask"):
            loss_fn(student, student, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="temperature"):
        losses.opd_kl(0.5, temperature=0.0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_kernel_dispatch_matches_dense(alpha):
    rng = np.random.default_rng(17)
    student, teacher, mask = (jnp.asarray(x, jnp.float32) for x in _logits(rng, v=256))

    def value_and_grad(impl):
        fn = losses.opd_kl(alpha, temperature=0.8, impl=impl)
        return jax.value_and_grad(lambda s: fn(s, teacher, mask)[0])(student)

    dense_loss, dense_grad = value_and_grad(None)
    kernel_loss, kernel_grad = value_and_grad("xla")
    np.testing.assert_allclose(kernel_loss, dense_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernel_grad, dense_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_kernels_run_per_device_on_a_mesh(impl):
    # A Pallas kernel cannot be split by XLA (Mosaic refuses a multi-device program outright), so
    # under a mesh opd_kl runs it inside shard_map on each device's rows. The logits arrive laid
    # out as the model leaves them: batch over (data, fsdp), vocabulary over tensor.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxpost import sharding

    rng = np.random.default_rng(5)
    b, l, v = 8, 3, 256  # 24 rows: 3 per device on (2, 2, 2)
    student = jnp.asarray(rng.normal(size=(b, l, v)) * 2, jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(b, l, v)) * 2, jnp.float32)
    mask = jnp.asarray(rng.random((b, l)) < 0.8, jnp.float32)
    fn = losses.opd_kl(1.0, impl=impl)

    def loss(s, t, m):
        return fn(s, t, m)[0]

    dense_loss, dense_grad = jax.value_and_grad(lambda s: losses.opd_kl(1.0)(s, teacher, mask)[0])(
        student)  # fmt: skip
    mesh = sharding.make_mesh("2,2,2")
    logits = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    args = (jax.device_put(student, logits), jax.device_put(teacher, logits),
            jax.device_put(mask, NamedSharding(mesh, P(("data", "fsdp"), None))))  # fmt: skip
    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss))
        assert "shard_map" in str(jax.make_jaxpr(step)(*args))
        value, grad = step(*args)
    np.testing.assert_allclose(value, dense_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-7)
    # every mesh axis splits the rows when they divide: (data, fsdp, tensor) here
    jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a)[0])(student, teacher, mask))
    assert "shard_map" not in jaxpr  # no mesh: the kernel is called directly
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a)[0])(student, teacher, mask))
    assert "P(('data', 'fsdp', 'tensor'), None)" in jaxpr
    few = (student[:4], teacher[:4], mask[:4])
    with jax.set_mesh(mesh):  # 12 rows do not split 8 ways: tensor devices repeat their rows
        jaxpr = str(jax.make_jaxpr(lambda *a: fn(*a)[0])(*few))
        value, grad = jax.jit(jax.value_and_grad(loss))(*few)
    assert "P(('data', 'fsdp'), None)" in jaxpr and "newly_manual_axes" in jaxpr
    # the repeated rows count once, in the value and in the gradient
    dense_loss, dense_grad = jax.value_and_grad(lambda s: losses.opd_kl(1.0)(s, *few[1:])[0])(few[0])
    np.testing.assert_allclose(value, dense_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-7)
    # Inside a caller's shard_map over data, the kernel splits only the axes still free. (GPU
    # kernel only: the TPU interpreter nested in a partly manual shard_map aborts XLA:CPU's
    # compiler in jax 0.10.2, a crash of the interpreter, not a wrong value.)
    if impl == "pallas_gpu":
        ones = jnp.ones_like(mask)  # equal rows per data shard: the mean of shard means is the mean
        with jax.set_mesh(mesh):
            outer = jax.shard_map(lambda s, t, m: jax.lax.pmean(fn(s, t, m)[0], "data"),
                                  in_specs=(P("data"),) * 3, out_specs=P(), axis_names={"data"},
                                  check_vma=False)  # fmt: skip
            grad = jax.jit(jax.grad(outer))(student, teacher, ones)
        dense_grad = jax.grad(lambda s: losses.opd_kl(1.0)(s, teacher, ones)[0])(student)
        np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-7)
    explicit = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, (jax.sharding.AxisType.Explicit,) * 3)
    with jax.set_mesh(explicit), pytest.raises(ValueError, match="Explicit axes"):
        fn(student, teacher, mask)


# ---------------------------------------------------------------------------------------------
# variants


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_entropy_aware_opd_matches_reference(threshold):
    rng = np.random.default_rng(18)
    student, teacher, mask = _logits(rng, scale=1.5)
    teacher[0, :2] *= 0.05  # near-uniform teacher rows: high entropy, forward-KL heavy
    s, t = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    loss, aux = losses.entropy_aware_opd_kl(temperature=0.9, threshold=threshold)(
        s, t, jnp.asarray(mask)
    )
    p_s, p_t = (
        ref.softmax(np.asarray(s, np.float64) / 0.9),
        ref.softmax(np.asarray(t, np.float64) / 0.9),
    )
    h = ref.entropy(p_t) / np.log(student.shape[-1])
    w = np.clip(h, 0, 1) if threshold is None else (h > threshold).astype(np.float64)
    per_token = (1 - w) * ref.kl(p_s, p_t) + w * ref.kl(p_t, p_s)
    np.testing.assert_allclose(loss, ref.masked_mean(per_token, mask), rtol=2e-5)
    np.testing.assert_allclose(
        aux["forward_weight"], ref.masked_mean(w, mask), rtol=2e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        aux["teacher_entropy"], ref.masked_mean(ref.entropy(p_t), mask), rtol=2e-5
    )
    with jax.enable_x64(True):
        fn = losses.entropy_aware_opd_kl(threshold=threshold)
        t64, m64 = jnp.asarray(teacher[:1, :2]), jnp.ones((1, 2))
        ref.assert_grad_matches_finite_differences(lambda x: fn(x, t64, m64)[0], student[:1, :2])


def test_prefix_mask_and_prefix_opd():
    mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(
        losses.prefix_mask(mask, 2), [[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(losses.prefix_mask(mask, 0), np.zeros((3, 5)))
    np.testing.assert_array_equal(losses.prefix_mask(mask, 9), mask)
    rng = np.random.default_rng(19)
    student, teacher, _ = _logits(rng, l=5)
    s, t = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    loss, aux = losses.prefix_opd(losses.opd_kl(1.0), 2)(s, t, mask)
    expect = ref.masked_mean(
        ref.generalized_jsd(student, teacher, 1.0), losses.prefix_mask(mask, 2)
    )
    np.testing.assert_allclose(loss, expect, rtol=2e-5)
    assert aux["num_tokens"] == 4
    with pytest.raises(ValueError, match="prefix_len"):
        losses.prefix_mask(mask, -1)


def test_reverse_kl_token_advantages():
    rng = np.random.default_rng(20)
    student, teacher = rng.normal(size=(2, 2, 4, 7))
    tokens = jnp.asarray(rng.integers(0, 7, size=(2, 4)))
    mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
    logp_s = losses.token_logprobs(jnp.asarray(student, jnp.float32), tokens)
    logp_t = losses.token_logprobs(jnp.asarray(teacher, jnp.float32), tokens)
    adv = losses.reverse_kl_token_advantages(logp_s, logp_t, mask)
    take = lambda x: np.take_along_axis(ref.log_softmax(x), np.asarray(tokens)[..., None], -1)[
        ..., 0
    ]
    np.testing.assert_allclose(adv, (take(teacher) - take(student)) * mask, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda x: losses.reverse_kl_token_advantages(x, logp_t, mask).sum())(logp_s)
    assert np.all(np.asarray(grad) == 0)


def test_sampled_token_policy_gradient_is_reverse_kl_gradient_in_expectation():
    """Σ_y p_S(y) · [policy gradient with A(y) = log p_T(y) − log p_S(y)] = ∇ KL(p_S ‖ p_T).

    One position, every vocabulary entry as the "sampled" token (one row each), each weighted by
    its probability under the student: the exact expectation of the sampled estimator.
    """
    rng = np.random.default_rng(21)
    vocab = 9
    with jax.enable_x64(True):
        student = jnp.asarray(rng.normal(size=(1, 1, vocab)))
        teacher = jnp.asarray(rng.normal(size=(1, 1, vocab)))
        every_token = jnp.arange(vocab)[:, None]  # [V, 1]: row y samples token y
        ones = jnp.ones((vocab, 1))

        def expected_pg_loss(s):
            rows = jnp.broadcast_to(s[0], (vocab, 1, vocab))
            logp_s = losses.token_logprobs(rows, every_token)
            logp_t = losses.token_logprobs(
                jnp.broadcast_to(teacher[0], (vocab, 1, vocab)), every_token
            )
            adv = losses.reverse_kl_token_advantages(logp_s, logp_t, ones)
            weight = jax.lax.stop_gradient(jnp.exp(logp_s)) * vocab  # dapo divides by V rows
            return losses.grpo_loss(logp_s, jax.lax.stop_gradient(logp_s), adv * weight, ones)[0]

        pg_grad = jax.grad(expected_pg_loss)(student)
        kl_grad = jax.grad(lambda s: losses.opd_kl(1.0)(s, teacher, jnp.ones((1, 1)))[0])(student)
    np.testing.assert_allclose(pg_grad, kl_grad, rtol=1e-10, atol=1e-12)


def test_align_completion_lines_up_two_views():
    """Teacher view: 4-token privileged prompt; student view: 2-token prompt; same completion."""
    rng = np.random.default_rng(22)
    completion_len = 3
    completion = rng.normal(size=(2, completion_len + 1, 5)).astype(
        np.float32
    )  # predict completion
    noise = lambda n: rng.normal(size=(2, n, 5)).astype(np.float32)
    teacher_view = np.concatenate([noise(3), completion, noise(2)], 1)
    student_view = np.concatenate([noise(1), completion], 1)
    # row 1 of the teacher view has a shorter privileged prompt and more right padding
    teacher_view[1] = np.concatenate([teacher_view[1, 1:], noise(1)[0]], 0)
    t = losses.align_completion(jnp.asarray(teacher_view), jnp.asarray([4, 3]), completion_len)
    s = losses.align_completion(jnp.asarray(student_view), jnp.asarray([2, 2]), completion_len)
    np.testing.assert_array_equal(t, completion[:, :completion_len])
    np.testing.assert_array_equal(s, completion[:, :completion_len])
    with pytest.raises(ValueError, match="do not fit"):
        losses.align_completion(jnp.asarray(student_view), jnp.asarray([0, 2]), completion_len)
    with pytest.raises(ValueError, match="do not fit"):
        losses.align_completion(jnp.asarray(student_view), jnp.asarray([2, 4]), completion_len)
    jitted = jax.jit(losses.align_completion, static_argnums=2)
    np.testing.assert_array_equal(
        jitted(jnp.asarray(teacher_view), jnp.asarray([4, 3]), completion_len), t
    )
