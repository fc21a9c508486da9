"""GAD (jaxpost.gad): the discriminator's score and Bradley-Terry loss against references, a
discriminator that learns to separate teacher from student samples on a toy case, the joint
objective's gradients (warm-up SFT, GRPO on D's scores, BT), and the loop end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpost import data, gad, losses, models, train
from jaxpost.rollouts import PromptSource, SamplingConfig
from jaxpost.runner import LoopConfig
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size, eos_id=TOK.eos_id)


def _disc(seed=0):
    d = gad.init_discriminator(models.init(CONFIG, seed=seed))
    rng = np.random.default_rng(seed)
    d["head"] = {"w": jnp.asarray(rng.normal(size=d["head"]["w"].shape), jnp.float32),
                 "b": jnp.float32(0.3)}  # fmt: skip
    return d


def _batch(prompts, completions, width=8, M=6):
    pt, pm = data.left_pad(prompts, width, TOK.pad_id)
    ct = np.full((len(completions), M), TOK.pad_id, np.int32)
    cm = np.zeros((len(completions), M), np.int32)
    for i, c in enumerate(completions):
        ct[i, : len(c)], cm[i, : len(c)] = c, 1
    return pt, pm, ct, cm


def test_the_score_is_the_head_on_the_last_completion_token_of_an_unpadded_forward():
    disc = _disc()
    prompts = [TOK.encode("12+3", add_bos=True), TOK.encode("7", add_bos=True)]
    completions = [TOK.encode("15"), TOK.encode("7=7x") + [TOK.eos_id]]
    got = np.asarray(gad.scores(CONFIG, disc, *_batch(prompts, completions)))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = jnp.asarray([p + c])
        h = np.asarray(models.hidden_states(CONFIG, disc["model"], seq))[0, -1]
        want = h.astype(np.float64) @ np.asarray(disc["head"]["w"], np.float64) + 0.3
        np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-4)


def test_bt_loss_against_float64_and_finite_differences():
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=7) * 3, rng.normal(size=7) * 3
    want = np.mean(np.log1p(np.exp(-(t - s))))
    with jax.enable_x64(True):
        got = gad.bt_loss(jnp.asarray(t), jnp.asarray(s))
        np.testing.assert_allclose(float(got), want, rtol=1e-12)
        g_t, g_s = jax.grad(gad.bt_loss, argnums=(0, 1))(jnp.asarray(t), jnp.asarray(s))
        h = 1e-6
        for i in range(len(t)):
            e = np.zeros_like(t)
            e[i] = h
            fd_t = (gad.bt_loss(t + e, s) - gad.bt_loss(t - e, s)) / (2 * h)
            fd_s = (gad.bt_loss(t, s + e) - gad.bt_loss(t, s - e)) / (2 * h)
            np.testing.assert_allclose(float(g_t[i]), float(fd_t), rtol=1e-6, atol=1e-10)
            np.testing.assert_allclose(float(g_s[i]), float(fd_s), rtol=1e-6, atol=1e-10)


def test_the_discriminator_learns_to_separate_teacher_from_student_samples():
    """Toy: the teacher answers with even digits, the student with odd ones; D trained by BT
    on some prompts ranks every held-out pair right."""
    rng = np.random.default_rng(2)

    def pairs(n):
        prompts = [TOK.encode(f"{a}+{b}", add_bos=True) for a, b in rng.integers(0, 50, (n, 2))]
        teach = [TOK.encode("".join(str(d) for d in rng.choice([0, 2, 4, 6, 8], 3))) + [TOK.eos_id]
                 for _ in range(n)]  # fmt: skip
        stud = [TOK.encode("".join(str(d) for d in rng.choice([1, 3, 5, 7, 9], 3))) + [TOK.eos_id]
                for _ in range(n)]  # fmt: skip
        return _batch(prompts, teach), _batch(prompts, stud)

    train_t, train_s = pairs(16)
    test_t, test_s = pairs(16)
    disc = gad.init_discriminator(models.init(CONFIG, seed=0))
    opt = optax.adam(3e-3)
    state = opt.init(disc)

    def loss(d, t, s):
        return gad.bt_loss(gad.scores(CONFIG, d, *t), gad.scores(CONFIG, d, *s))

    @jax.jit
    def step(d, state):
        value, g = jax.value_and_grad(loss)(d, train_t, train_s)
        updates, state = opt.update(g, state)
        return optax.apply_updates(d, updates), state, value

    first = float(loss(disc, train_t, train_s))
    for _ in range(40):
        disc, state, _ = step(disc, state)
    assert np.isclose(first, np.log(2), atol=1e-6)  # a zero head: every pair undecided
    assert float(loss(disc, train_t, train_s)) < 0.05
    t, s = gad.scores(CONFIG, disc, *test_t), gad.scores(CONFIG, disc, *test_s)
    assert np.all(np.asarray(t) > np.asarray(s))


def _joint_batch(warm: bool, G=2):
    prompts = [TOK.encode("3+4", add_bos=True)] * G + [TOK.encode("10", add_bos=True)] * G
    students = [TOK.encode("7") + [TOK.eos_id], TOK.encode("8"), TOK.encode("1+"),
                TOK.encode("10") + [TOK.eos_id]]  # fmt: skip
    pt, pm, ct, cm = _batch(prompts, students)
    _, _, dt, dm = _batch(prompts[::G], [TOK.encode("7") + [TOK.eos_id], TOK.encode("5+5")])
    rng = np.random.default_rng(3)
    batch = data.CompletionBatch(pt, pm, ct, cm, old_logp=rng.normal(size=ct.shape) * 0.1 - 2,
                                 sampling_logp=None)  # fmt: skip
    batch = gad.with_demos(batch, dt, dm, G, warm)
    return jax.tree.map(jnp.asarray, batch)


@pytest.mark.parametrize("warm", [True, False])
def test_the_joint_objective_is_sft_or_grpo_on_d_scores_plus_bt(warm):
    G = 2
    trained = {"policy": models.init(CONFIG, seed=4), "disc": _disc(5)}
    batch = _joint_batch(warm, G)
    (loss, aux), g = jax.jit(jax.value_and_grad(gad.objective(CONFIG, G), has_aux=True))(
        trained, batch)  # fmt: skip
    prompt = (batch.prompt_tokens, batch.prompt_mask)
    s = gad.scores(CONFIG, trained["disc"], *prompt, batch.completion, batch.completion_mask)
    t = gad.scores(CONFIG, trained["disc"], *prompt, batch.demo, batch.demo_mask)

    def bt(d):
        return gad.bt_loss(gad.scores(CONFIG, d, *prompt, batch.demo, batch.demo_mask),
                           gad.scores(CONFIG, d, *prompt, batch.completion, batch.completion_mask))

    demo = batch.replace(completion=batch.demo, completion_mask=batch.demo_mask)
    adv, _ = losses.group_advantages(s, G)
    grpo = train.grpo_objective(CONFIG)

    def policy_loss(p):
        if warm:  # SFT on the teacher's responses, token mean
            lp = train.completion_logprobs(CONFIG, p, demo)
            return -(lp * demo.completion_mask).sum() / demo.completion_mask.sum()
        return grpo(p, batch.replace(advantages=adv))[0]

    want = float(policy_loss(trained["policy"]) + bt(trained["disc"]))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(aux["disc_acc"]), np.mean(np.asarray(t > s)))
    assert float(aux["warmup"]) == float(warm)
    for got, ref in ((g["policy"], jax.jit(jax.grad(policy_loss))(trained["policy"])),
                     (g["disc"], jax.jit(jax.grad(bt))(trained["disc"]))):  # fmt: skip
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_loop_warms_up_then_trains_on_the_discriminator_and_resumes(tmp_path, monkeypatch):
    prompts = [TOK.encode(s, add_bos=True) for s in ("ab", "cde", "fg", "h")]
    source = PromptSource(prompts=prompts, reward=lambda i, c: float(c[0] % 2 == 0),
                          eos_id=TOK.eos_id, pad_id=TOK.pad_id)  # fmt: skip
    student, teacher = models.init(CONFIG, seed=0), models.init(CONFIG, seed=1)
    sampling = SamplingConfig(group_size=2, max_new_tokens=5)

    def run(steps):
        return gad.run(CONFIG, student, CONFIG, teacher, source,
                       train.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=3),
                       LoopConfig(steps=steps, batch_size=2, workdir=str(tmp_path)), sampling,
                       warmup=1, disc_lr_scale=10.0)  # fmt: skip

    first = run(2)
    assert [h["warmup"] for h in first.history] == [1.0, 0.0]
    assert all(0 <= h["teacher_reward"] <= 1 and 0 <= h["disc_acc"] <= 1 for h in first.history)
    disc = first.state.params["disc"]
    assert float(jnp.abs(disc["head"]["w"]).sum()) > 0  # D moved off its zero head
    assert jax.tree.structure(first.params) == jax.tree.structure(student)
    resumed = []
    fn = gad.objective

    def spy(*args, **kw):  # the discriminator the resumed run starts from: step 2's
        inner = fn(*args, **kw)

        def objective(trained, batch):
            jax.debug.callback(lambda w: resumed.append(np.asarray(w)), trained["disc"]["head"]["w"])
            return inner(trained, batch)

        return objective

    monkeypatch.setattr(gad, "objective", spy)
    more = run(3)  # resumes from step 2's checkpoint
    assert [h["step"] for h in more.history] == [3]
    assert int(more.state.step) == 3
    np.testing.assert_array_equal(resumed[0], np.asarray(disc["head"]["w"]))


def test_the_discriminators_updates_are_scaled_after_the_optimizer():
    params = {"policy": {"w": jnp.ones(3)}, "disc": {"w": jnp.ones(2)}}
    grads = {"policy": {"w": jnp.asarray([1.0, -2.0, 3.0])}, "disc": {"w": jnp.asarray([0.5, -1.0])}}
    plain, scaled = optax.adam(1e-2), optax.chain(optax.adam(1e-2), gad.scale_updates("disc", 10.0))
    u0, _ = plain.update(grads, plain.init(params), params)
    u1, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(u1["policy"]["w"], u0["policy"]["w"])
    np.testing.assert_allclose(u1["disc"]["w"], 10.0 * np.asarray(u0["disc"]["w"]), rtol=1e-6)
