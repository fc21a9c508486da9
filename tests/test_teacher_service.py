"""Top-k teachers as a service (jaxpost.teacher_service): several teachers each score their own
rows (against each teacher's plain scoring program), the score cache returns what the teacher
gave, dead slots fold into the student's tail (float64), and a teacher on its own devices trains
the student exactly as one on the student's device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from jaxpost import data, loops, losses, models, sharding, teachers, train
from jaxpost.teacher_service import ScoreCache, TopkTeachers
from jaxpost.tokenizers import CharTokenizer

TOK = CharTokenizer()
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size)
K = 6


def _batch(rows=6, m=8, seed=0):
    rng = np.random.default_rng(seed)
    prompt, prompt_mask = data.left_pad([TOK.encode("12+3=" * (1 + r % 2), add_bos=True)
                                         for r in range(rows)], 16, TOK.pad_id)  # fmt: skip
    completion = rng.integers(3, TOK.vocab_size, size=(rows, m)).astype(np.int32)
    lengths = rng.integers(2, m + 1, size=rows)
    mask = (np.arange(m)[None] < lengths[:, None]).astype(np.int32)
    return data.CompletionBatch(prompt, prompt_mask, completion * mask, mask)


def _plain(params, batch):
    top = jax.jit(teachers.topk_teacher(CONFIG, K))(params, batch)
    return jax.tree.map(np.asarray, top)


def _valid_equal(a, b, mask):
    m = np.asarray(mask, bool)
    np.testing.assert_array_equal(a.idx[m], b.idx[m])
    np.testing.assert_allclose(a.logp[m], b.logp[m], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.log_tail[m], b.log_tail[m], rtol=1e-5, atol=1e-6)


def test_several_teachers_each_score_their_own_rows():
    batch = _batch()
    t0, t1 = models.init(CONFIG, seed=1), models.init(CONFIG, seed=2)
    problems = [0, 1, 2, 3, 5, 7]  # rows 0, 2 -> teacher 0 (even problems); 1, 3, 4, 5 -> 1
    service = TopkTeachers([(CONFIG, t0), (CONFIG, t1)], K, route=lambda p: p % 2)
    top, mask, metrics = service(batch, problems)
    assert mask is None and metrics == {"teacher_0_rows": 2.0, "teacher_1_rows": 4.0}
    ref0, ref1 = _plain(t0, batch), _plain(t1, batch)
    for r, p in enumerate(problems):
        ref = ref0 if p % 2 == 0 else ref1
        row = jax.tree.map(lambda x, r=r: x[r : r + 1], top)
        _valid_equal(row, jax.tree.map(lambda x, r=r: x[r : r + 1], ref),
                     batch.completion_mask[r : r + 1])  # fmt: skip
    assert not np.allclose(ref0.logp, ref1.logp)  # the two teachers do differ
    with pytest.raises(ValueError, match="need a route"):
        TopkTeachers([(CONFIG, t0), (CONFIG, t1)], K)
    with pytest.raises(ValueError, match="vocabularies differ"):
        TopkTeachers([(CONFIG, t0), (models.get_config("tiny", vocab_size=64), t1)], K,
                     route=lambda p: 0)  # fmt: skip


def test_the_cache_returns_the_teachers_scores_and_evicts_the_oldest():
    batch = _batch(seed=1)
    params = models.init(CONFIG, seed=3)
    service = TopkTeachers([(CONFIG, params)], K, cache_rows=64)
    first, _, m1 = service(batch, list(range(6)))
    second, _, m2 = service(batch, list(range(6)))
    assert m1["teacher_cache_hit_frac"] == 0.0 and m2["teacher_cache_hit_frac"] == 1.0
    _valid_equal(first, _plain(params, batch), batch.completion_mask)
    _valid_equal(second, first, batch.completion_mask)
    # a row's key is its content: the same completion with another padding tail is a hit
    other = batch.replace(completion=np.where(batch.completion_mask > 0, batch.completion, 7))
    _, _, m3 = service(other, list(range(6)))
    assert m3["teacher_cache_hit_frac"] == 1.0
    small = TopkTeachers([(CONFIG, params)], K, cache_rows=2)
    small(batch, list(range(6)))
    assert len(small.cache.rows) == 2
    with pytest.raises(ValueError, match="max_rows >= 1"):
        ScoreCache(0)


def test_dead_slots_fold_into_the_student_tail_float64():
    rng = np.random.default_rng(0)
    n, v, k = 5, 12, 4
    s_logits = rng.normal(size=(n, v))
    s = s_logits - np.log(np.exp(s_logits).sum(-1, keepdims=True))
    idx = np.stack([rng.permutation(v)[:k] for _ in range(n)])
    t = np.log(rng.dirichlet(np.ones(k + 1), size=n))
    t[0, 2:4] = -np.inf  # row 0: two dead slots; row 1: all slots dead; the rest none
    t[1, :k] = -np.inf
    t[1, k] = 0.0
    t[0] = np.concatenate([t[0, :k], [np.log(1 - np.exp(t[0, :k]).sum())]])
    dead = np.isneginf(t[:, :k])
    p = np.exp(s)
    ref = []
    for r in range(n):  # reverse KL over the folded buckets, in float64
        live = [j for j in range(k) if not dead[r, j]]
        ps = np.array([p[r, idx[r, j]] for j in live] + [1 - sum(p[r, idx[r, j]] for j in live)])
        pt = np.exp(np.concatenate([t[r, live], t[r, k:]]))
        ref.append(np.sum(ps * (np.log(ps) - np.log(pt))))

    def div(logits):
        logp = jax.nn.log_softmax(logits, -1)
        buckets = kernels.bucket_logprobs_from_logits(logp, jnp.asarray(idx, jnp.int32))
        folded = teachers._fold_dead(buckets, jnp.asarray(t, jnp.float32))
        return kernels.bucket_divergence(folded, jnp.asarray(t, jnp.float32), 1.0)

    out = div(jnp.asarray(s_logits, jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
    grad = jax.grad(lambda x: div(x).sum())(jnp.asarray(s_logits, jnp.float32))
    assert np.all(np.isfinite(grad))


@pytest.mark.slow
def test_a_teacher_on_its_own_devices_trains_the_student_as_on_one_device():
    """The student on devices 0-3 (data 2 x tensor 2), its top-k teacher FSDP-sharded over
    devices 4-7: the teacher's parameters never touch the student's devices, and the run equals
    the one-device run."""
    devices = jax.devices()
    student_mesh = sharding.make_mesh((2, 1, 2), devices=devices[:4])
    teacher_mesh = sharding.make_mesh((1, 4, 1), devices=devices[4:])
    params, teacher = models.init(CONFIG, seed=0), models.init(CONFIG, seed=1)
    prompts = [TOK.encode(f"{i}+{i}=", add_bos=True) for i in range(8)]
    source = loops.PromptSource(prompts, eos_id=TOK.eos_id, pad_id=TOK.pad_id)
    optim = train.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=2, eps=1e-2)
    loop = loops.LoopConfig(steps=2, batch_size=4, seed=1, progress=False)
    sampling = loops.SamplingConfig(group_size=2, max_new_tokens=8)
    loss = losses.opd_kl(1.0)

    one = loops.run_opd(CONFIG, params, CONFIG, teacher, source, loss, optim, loop, sampling,
                        teacher_topk=K)  # fmt: skip
    service = TopkTeachers([(CONFIG, teacher)], K, mesh=teacher_mesh)
    assert all(set(x.sharding.device_set) <= set(devices[4:]) for x in jax.tree.leaves(service.params))
    split = loops.run_opd(CONFIG, params, CONFIG, None, source, loss, optim, loop, sampling,
                          teacher_topk=service, mesh=student_mesh)  # fmt: skip
    assert all(set(x.sharding.device_set) <= set(devices[:4])
               for x in jax.tree.leaves(split.state.params))  # fmt: skip
    for a, b in zip(one.history, split.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 one.state.params, jax.device_get(split.state.params))  # fmt: skip


def test_feedback_views_hold_the_verifiers_message_on_each_rows_own_attempt():
    import types

    from jaxpost import rollouts, tasks
    from jaxpost.recipes import opd_teachers
    from jaxpost.tasks import countdown

    task = countdown.Countdown(num_numbers=(3, 3), number_range=(1, 9), target_range=(10, 40),
                               min_solutions=2)  # fmt: skip
    problems = task.prompts("train", 4, seed=0)
    prompts = [TOK.encode(task.render_prompt(p), add_bos=True) for p in problems]
    view, width = opd_teachers.feedback_source(task, problems, types.SimpleNamespace(tokenizer=TOK),
                                               prompts)  # fmt: skip
    source = loops.PromptSource(prompts, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
                                teacher_feedback=view, teacher_width=width)  # fmt: skip
    assert source.privileged and source.width(teacher=True) >= width
    sampling = loops.SamplingConfig(group_size=2, max_new_tokens=12)
    r = rollouts.sample_step(CONFIG, models.init(CONFIG, seed=0), source, sampling, batch_size=4,
                             seed=0, step=1)  # fmt: skip
    tokens, mask = r.batch.teacher_prompt()
    for row, (i, completion) in enumerate(zip(r.problems, r.completions)):
        message = tasks.feedback(task, problems[i], TOK.decode(completion))
        expected = f"Feedback on an earlier attempt: {message}\n{task.render_prompt(problems[i])}"
        assert TOK.decode(np.asarray(tokens[row])[np.asarray(mask[row]) > 0]) == expected
    right = task.render_completion(problems[0], task.solutions(problems[0])[0])
    assert tasks.feedback(task, problems[0], right) == "correct"
    with pytest.raises(ValueError, match="needs teacher_width"):
        loops.PromptSource(prompts, teacher_feedback=view)
