"""The task protocol's invariants on every built-in task; the retention and steering tasks."""

import numpy as np
import pytest

from jaxpost import metrics
from jaxpost.tasks import Task, addition, countdown, steer
from jaxpost.tokenizers import CharTokenizer

TASKS = [countdown.Countdown(), addition.Addition(), countdown.Countdown().steering()]
GARBAGE = ["", ";", "=,;", "1+", "((((", "x" * 300, "1" * 50 + ";" + "9" * 50, "\n\n"]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_protocol_invariants(task):
    assert isinstance(task, Task)
    train, test = task.prompts("train", 8, seed=5), task.prompts("test", 8, seed=5)
    assert train == task.prompts("train", 8, seed=5) and not set(train) & set(test)
    tok = CharTokenizer()
    for p in train + test:
        sols = task.solutions(p)
        assert sols == sorted(set(sols)) and sols
        for s in sols:
            completion = task.render_completion(p, s)
            assert tok.covers(task.render_prompt(p) + completion)
            assert task.verify_answer(p, completion) and task.verify_chain(p, completion)
            assert task.canonical(p, completion) == s
        for g in GARBAGE:
            assert not task.verify_answer(p, g) and not task.verify_chain(p, g)
            assert task.canonical(p, g) is None


def test_addition_verifiers():
    task = addition.Addition()
    p = addition.AdditionProblem(47, 85)
    assert task.render_prompt(p) == "47+85:"
    assert task.render_completion(p, "132") == "7+5=12,4+8+1=13;132"
    assert task.verify_chain(p, " 7+5=12, 4+8+1=13 ; 132 ")
    assert task.verify_answer(p, "132") and not task.verify_chain(p, "132")
    assert not task.verify_answer(p, "7+5=12,4+8+1=13;0132")  # leading zero
    assert not task.verify_answer(p, "7+5=12,4+8+1=13;122")
    assert task.verify_answer(p, "7+5=12,4+8=12;132")  # forgot the carry, right answer
    assert not task.verify_chain(p, "7+5=12,4+8=12;132")
    assert not task.verify_chain(p, "7+5=12;132")  # truncated chain
    assert task.render_completion(addition.AdditionProblem(5, 995), "1000") == (
        "5+5=10,0+9+1=10,0+9+1=10;1000"
    )
    with pytest.raises(ValueError):
        task.render_completion(p, "131")
    problems = addition.Addition(digits=(4, 4)).prompts("train", 20, seed=0)
    assert all(1000 <= q.a <= 9999 and 1000 <= q.b <= 9999 for q in problems)


def test_steer_probe():
    task = countdown.Countdown().steering()
    problems = task.prompts("train", 10, seed=0)
    assert problems == task.prompts("train", 10, seed=0)
    for p in problems:
        assert task.render_prompt(p).endswith(f" first {p.opening}:")
        requested = task.requested_distribution(p)
        assert sum(requested.values()) == pytest.approx(1.0)
        compliant = set(requested)
        assert compliant and compliant < set(task.solutions(p))  # the instruction matters
        for s in task.solutions(p):
            completion = task.render_completion(p, s)
            assert task.complies(p, completion) == (s in compliant)
            assert task.compliant_canonical(p, completion) == (s if s in compliant else None)


def test_steer_compliance_on_written_chains():
    task = countdown.Countdown().steering()
    base = countdown.CountdownProblem((2, 3, 4, 6), 11)
    p = steer.SteerProblem(base, "-")
    assert task.complies(p, "6-3=3,2*4=8,8+3=11;(2*4)+(6-3)")
    assert not task.complies(p, "2*4=8,6-3=3,8+3=11;(2*4)+(6-3)")  # same solution, other order
    assert not task.complies(p, "6-3=4,2*4=8,8+3=11;(2*4)+(6-3)")  # wrong step
    assert not task.complies(p, "garbage")


def test_steer_metrics_end_to_end():
    """A policy that samples uniformly among compliant solutions is perfectly steered."""
    task = countdown.Countdown().steering()
    p = task.prompts("test", 1, seed=1)[0]
    requested = task.requested_distribution(p)
    sols = list(requested) * 50
    produced = [task.compliant_canonical(p, task.render_completion(p, s)) for s in sols]
    assert metrics.compliance_rate([x is not None for x in produced]) == 1.0
    assert metrics.steer_distance(produced, requested, smoothing=0.0)["tv"] == pytest.approx(0.0)
    others = [s for s in task.solutions(p) if s not in requested]
    produced = [task.compliant_canonical(p, task.render_completion(p, s)) for s in others]
    assert metrics.steer_distance(produced, requested)["tv"] == pytest.approx(1.0)
    assert np.isfinite(metrics.steer_distance(produced, requested)["kl"])
