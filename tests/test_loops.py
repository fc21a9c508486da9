"""The training loops: learning is real, bad input is refused, a killed run resumes bit-for-bit."""

import dataclasses
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxpost import data, loops, losses, models, sampler, sharding, train
from jaxpost.tasks import countdown
from jaxpost.tokenizers import CharTokenizer

pytestmark = pytest.mark.slow  # every test trains

TOK = CharTokenizer()
TASK = countdown.Countdown(num_numbers=(3, 3), number_range=(1, 9), target_range=(10, 40),
                           min_solutions=2)  # fmt: skip
PROBLEMS = TASK.prompts("train", 16, seed=0)
PROMPTS = [TOK.encode(TASK.render_prompt(p), add_bos=True) for p in PROBLEMS]
CONFIG = models.get_config("tiny", vocab_size=TOK.vocab_size)


def _reward(i, completion):
    return float(TASK.verify_answer(PROBLEMS[i], TOK.decode(completion)))


SOURCE = loops.PromptSource(prompts=PROMPTS, reward=_reward, eos_id=TOK.eos_id, pad_id=TOK.pad_id)


def _sampling(group_size, max_new_tokens=32):
    return loops.SamplingConfig(group_size=group_size, max_new_tokens=max_new_tokens)


def _pass_rate(params, n=16):
    r = sampler.generate(CONFIG, params, PROMPTS, max_new_tokens=32, temperature=1.0,
                         eos_id=TOK.eos_id, seed=1, num_samples=n)  # fmt: skip
    tokens, lengths = np.asarray(r.tokens), np.asarray(r.lengths)
    return float(np.mean([_reward(i // n, tokens[i, : lengths[i]]) for i in range(len(tokens))]))


def _sft(steps, params=None):
    pairs = countdown.sft_pairs(TASK, PROBLEMS, style="first", seed=0)
    optim = train.OptimConfig(learning_rate=1e-2, warmup_steps=10, total_steps=steps)
    loop = loops.LoopConfig(steps=steps, batch_size=16, progress=False)
    params = models.init(CONFIG, seed=0) if params is None else params
    return loops.run_sft(CONFIG, params, data.encode_pairs(TOK, pairs), optim, loop)


@pytest.fixture(scope="module")
def memorized():
    return _sft(150)


def test_sft_lifts_countdown_pass_rate_from_zero(memorized):
    untrained = _pass_rate(models.init(CONFIG, seed=0))
    trained = _pass_rate(memorized.state.params)
    assert untrained == 0.0
    assert trained >= 0.9, trained
    assert memorized.history[-1]["loss"] < 0.05 * memorized.history[0]["loss"]
    assert len(memorized.history) == 150 and memorized.history[-1]["step"] == 150


def test_a_run_leaves_the_callers_params_untouched(memorized):
    before = jax.tree.map(np.asarray, memorized.state.params)
    loop = loops.LoopConfig(steps=2, batch_size=4, progress=False)
    optim = train.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=2)
    loops.run_grpo(CONFIG, memorized.state.params, SOURCE, optim, loop, _sampling(2, 8))
    after = jax.tree.map(np.asarray, memorized.state.params)  # not deleted by donation
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_opd_lowers_the_student_teacher_divergence(memorized):
    # A fresh student distilled on its own samples towards the memorized teacher (reverse KL).
    optim = train.OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=30)
    loop = loops.LoopConfig(steps=30, batch_size=8, progress=False)
    result = loops.run_opd(CONFIG, models.init(CONFIG, seed=5), CONFIG, memorized.state.params,
                           SOURCE, losses.opd_kl(1.0), optim, loop, _sampling(4))  # fmt: skip
    loss = [h["loss"] for h in result.history]
    assert np.mean(loss[-5:]) < 0.85 * np.mean(loss[:5]), loss
    assert all(np.isfinite(loss)) and result.history[-1]["skipped"] == 0


def test_opsd_runs_with_privileged_teacher_prompts(memorized):
    views = [
        countdown.privileged_view(TASK, p, TASK.solutions(p)[0]) for p in PROBLEMS
    ]
    source = loops.PromptSource(
        prompts=PROMPTS, reward=_reward, eos_id=TOK.eos_id, pad_id=TOK.pad_id,
        teacher_prompts=[TOK.encode(v.teacher_prompt, add_bos=True) for v in views],
    )  # fmt: skip
    optim = train.OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=2)
    loop = loops.LoopConfig(steps=2, batch_size=4, progress=False)
    params = memorized.state.params
    result = loops.run_opd(CONFIG, params, CONFIG, params, source, losses.opd_kl(1.0), optim, loop,
                           _sampling(2))  # fmt: skip
    assert len(result.history) == 2
    assert all(np.isfinite(h["loss"]) and h["loss"] >= 0 for h in result.history)
    assert "pass_rate" in result.history[0]


def test_opd_takes_updates_per_batch_steps_on_each_batch(memorized):
    # Two loop steps at two updates a batch: four optimizer updates, one history row per batch,
    # and a different student than one update a batch on the same rollouts' seeds.
    optim = train.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=4)
    loop = loops.LoopConfig(steps=2, batch_size=4, progress=False)
    start = models.init(CONFIG, seed=5)

    def run(updates):
        return loops.run_opd(CONFIG, start, CONFIG, memorized.state.params, SOURCE,
                             losses.opd_kl(1.0), optim, loop, _sampling(2),
                             updates_per_batch=updates)  # fmt: skip

    once, twice = run(1), run(2)
    assert int(once.state.step) == 2 and int(twice.state.step) == 4
    assert len(twice.history) == 2
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(r.params)]) for r in (once, twice))
    assert np.all(np.isfinite(b)) and not np.allclose(a, b)


def test_grpo_logs_reward_kl_and_entropy(memorized):
    optim = train.OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=2)
    loop = loops.LoopConfig(steps=2, batch_size=4, progress=False)
    params = memorized.state.params
    result = loops.run_grpo(CONFIG, params, SOURCE, optim, loop, _sampling(4), ref_params=params,
                            kl_beta=0.1,
                            reward_transform=lambda r, lp: np.asarray(
                                losses.unlikeliness_rewards(r, lp, 4)))  # fmt: skip
    row = result.history[0]
    for key in ("loss", "reward", "pass_rate", "kl", "entropy", "sampled_tokens_per_s", "skipped"):
        assert key in row and np.isfinite(row[key]), key
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference


def test_bad_input_is_refused(memorized):
    params = memorized.state.params
    optim = train.OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=2)
    loop = loops.LoopConfig(steps=1, batch_size=2, progress=False)
    sampling = _sampling(2, 4)
    nan_source = loops.PromptSource(prompts=PROMPTS, reward=lambda i, c: float("nan"),
                                    eos_id=TOK.eos_id)  # fmt: skip
    with pytest.raises(ValueError, match="non-finite reward"):
        loops.run_grpo(CONFIG, params, nan_source, optim, loop, sampling)
    with pytest.raises(ValueError, match="ref_params"):
        loops.run_grpo(CONFIG, params, SOURCE, optim, loop, sampling, kl_beta=0.1)
    with pytest.raises(ValueError, match="reward"):
        loops.run_grpo(CONFIG, params, loops.PromptSource(prompts=PROMPTS), optim, loop, sampling)
    with pytest.raises(ValueError, match="group_size"):
        loops.SamplingConfig(group_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        loops.LoopConfig(batch_size=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        loops.run_sft(CONFIG, params, [([1] * 300, [3, 2])], optim, loop)


@pytest.mark.parametrize("paradigm", ["sft", "grpo", "opd"])
def test_loops_on_a_mesh_match_one_device(memorized, paradigm):
    # FSDP x tensor x data on 8 simulated devices: sharded state, batch, teacher and sampler.
    params = memorized.state.params
    teacher = _sft(3).state.params
    # A large Adam eps: with the default 1e-8 a near-zero gradient entry becomes a ±lr update whose
    # sign is reduction-order noise, which would hide a real sharding error behind a loose atol.
    optim = train.OptimConfig(learning_rate=3e-4, warmup_steps=0, total_steps=2, eps=1e-2)
    loop = loops.LoopConfig(steps=2, batch_size=4, seed=3, progress=False)
    sampling = _sampling(4, 16)

    def run(mesh):
        if paradigm == "sft":
            pairs = countdown.sft_pairs(TASK, PROBLEMS, style="all", seed=1)
            return loops.run_sft(CONFIG, params, data.encode_pairs(TOK, pairs), optim,
                                 dataclasses.replace(loop, batch_size=16), mesh=mesh)  # fmt: skip
        if paradigm == "grpo":
            return loops.run_grpo(CONFIG, params, SOURCE, optim, loop, sampling, ref_params=params,
                                  kl_beta=0.05, mesh=mesh)  # fmt: skip
        return loops.run_opd(CONFIG, params, CONFIG, teacher, SOURCE, losses.opd_kl(0.5), optim,
                             loop, sampling, mesh=mesh)  # fmt: skip

    one, sharded = run(None), run(sharding.make_mesh((2, 2, 2)))
    leaf = jax.tree.leaves(sharded.state.params)[0]
    assert len(leaf.sharding.device_set) == 8
    assert len(one.history) == len(sharded.history) == 2
    for a, b in zip(one.history, sharded.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 one.state.params, jax.device_get(sharded.state.params))  # fmt: skip


def test_a_batch_that_does_not_divide_over_the_mesh_is_refused(memorized):
    optim = train.OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=1)
    loop = loops.LoopConfig(steps=1, batch_size=3, progress=False)
    with pytest.raises(ValueError, match="data-parallel size 4"):
        loops.run_opd(CONFIG, memorized.state.params, CONFIG, memorized.state.params, SOURCE,
                      losses.opd_kl(1.0), optim, loop, _sampling(2, 4),
                      mesh=sharding.make_mesh((4, 1, 2)))  # fmt: skip


def _worker(workdir, out, pause=0.0):
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "loop_worker.py"),
           str(workdir), "12", str(out), str(pause)]  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)  # fmt: skip


@pytest.mark.slow
def test_sigkill_mid_training_resumes_bitwise(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _worker(whole, tmp_path / "whole.npz")
    victim = _worker(killed, tmp_path / "killed.npz", pause=0.4)
    for line in victim.stdout:  # kill once step 7 is done (checkpoints exist for 2, 4, 6)
        if line.strip() == "step 7":
            break
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.npz").exists()
    ckpt = killed / "checkpoints"
    steps = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
    assert steps and 2 <= steps[-1] <= 8, steps
    resumed = _worker(killed, tmp_path / "killed.npz")
    assert resumed.wait(timeout=300) == 0 and reference.wait(timeout=300) == 0
    a, b = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "killed.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_packed_sft_learns_and_resumes_bitwise(tmp_path):
    """Packed rows (`run_sft(pack=True)`): the loss falls, a step holds more examples than rows,
    and a run resumed from its step-3 checkpoint ends bit-for-bit where an unbroken one does."""
    texts = countdown.sft_pairs(TASK, PROBLEMS, style="first", seed=0)
    pairs = data.encode_pairs(TOK, texts + [(f"{i}+1=", str(i + 1)) for i in range(16)])
    optim = train.OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=8)

    def sft(steps, workdir=None):
        loop = loops.LoopConfig(steps=steps, batch_size=4, progress=False, workdir=workdir,
                                checkpoint_every=3)  # fmt: skip
        return loops.run_sft(CONFIG, models.init(CONFIG, seed=0), pairs, optim, loop, pack=True)

    whole = sft(8)
    losses_ = [h["loss"] for h in whole.history]
    assert losses_[-1] < 0.8 * losses_[0]
    assert np.mean([h["examples"] for h in whole.history]) > 5  # short examples share rows
    sft(3, str(tmp_path))
    resumed = sft(8, str(tmp_path))
    assert resumed.history[0]["step"] == 4
    for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grpo_raises_a_verifiable_reward():
    # Reward: the share of odd digits among the first six completion tokens. From a random tiny
    # model (reward ~0.05) forty GRPO rounds must at least triple it.
    prompts = [TOK.encode(f"{i} ->", add_bos=True) for i in range(16)]
    odd = set(TOK.encode("13579"))
    source = loops.PromptSource(
        prompts=prompts, reward=lambda i, c: sum(t in odd for t in c[:6]) / 6,
        eos_id=TOK.eos_id, pad_id=TOK.pad_id,
    )  # fmt: skip
    optim = train.OptimConfig(learning_rate=1e-3, warmup_steps=0, total_steps=40)
    loop = loops.LoopConfig(steps=40, batch_size=8, progress=False)
    result = loops.run_grpo(CONFIG, models.init(CONFIG, seed=0), source, optim, loop,
                            _sampling(8, 8))  # fmt: skip
    reward = [h["reward"] for h in result.history]
    assert np.mean(reward[-5:]) > 3 * np.mean(reward[:5]), reward

