"""Countdown: verifiers on hand-written completions, solution sets against brute force, splits."""

import itertools
from fractions import Fraction

import pytest

from jaxpost.tasks import Task, split_of
from jaxpost.tasks import countdown as cd

TASK = cd.Countdown()
P = cd.CountdownProblem((3, 5, 7), 22)


def test_is_a_task():
    assert isinstance(TASK, Task)
    assert TASK.render_prompt(P) == "3 5 7 -> 22:"


@pytest.mark.parametrize(
    "completion",
    [
        "3*5=15,7+15=22;7+(3*5)",
        "5*3=15,15+7=22;5*3+7",  # any operand order and precedence-implied parentheses
        " 3 * 5 = 15 , 15 + 7 = 22 ; (3*5)+7 ",  # spaces are ignored
    ],
)
def test_correct_completions(completion):
    assert TASK.verify_answer(P, completion)
    assert TASK.verify_chain(P, completion)
    assert TASK.canonical(P, completion) == "7+(3*5)"


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "banana",
        "\x00\xff;;;,,,=",
        "3*5=15,15+7=2",  # truncated
        "3*5=15,15+7=22;7+(3*",  # truncated answer
        "3*5=15,15+7=22;7+(3*5",  # unbalanced
        "5/0=0;5/0+22",  # division by zero
        "7-7=0;22+7-7",  # zero intermediate / uses 7 twice
        "7*3=21,21+1=22;7*3+1",  # 1 is not given
        "5+5=10;5+5+7",  # reuses 5 (target also wrong)
        "3*7=21,21+5=26;3*7+5",  # wrong target
        "7/2=3;7/2*3+12",  # inexact division
        "99999999999999999999*0;1",  # absurd numbers
        "(" * 500 + "3" + ")" * 500,  # deep nesting is bounded
        "3*5=15,15+7=22;22",  # a bare number is not an expression
    ],
)
def test_wrong_completions_are_false_never_raise(completion):
    assert not TASK.verify_answer(P, completion)
    assert not TASK.verify_chain(P, completion)
    assert TASK.canonical(P, completion) is None


@pytest.mark.parametrize(
    "completion",
    [
        "3*5=16,16+6=22;7+(3*5)",  # right answer, wrong arithmetic in the chain
        "3*5=15,15+15=30,15+7=22;7+(3*5)",  # reuses an intermediate result
        "3+5=8,8*7=56;7+(3*5)",  # chain of another computation
        "3*5=15;7+(3*5)",  # incomplete chain
        "15+7=22,3*5=15;7+(3*5)",  # uses a value before computing it
        "7+(3*5)",  # answer without a chain
        "3*5=15,7+15=22,;7+(3*5)",  # empty step
    ],
)
def test_right_answer_wrong_chain(completion):
    assert TASK.verify_answer(P, completion)
    assert not TASK.verify_chain(P, completion)


def test_reused_given_number_and_duplicates():
    p = cd.CountdownProblem((4, 4, 7), 15)
    assert TASK.verify_chain(p, "4+4=8,7+8=15;7+(4+4)")
    q = cd.CountdownProblem((4, 7, 9), 15)
    assert not TASK.verify_answer(q, "4+4+7")
    assert not TASK.verify_chain(q, "4+4=8,7+8=15;7+(4+4)")


def test_canonical_identifies_commutative_reorderings_only():
    p = cd.CountdownProblem((2, 3, 4), 9)
    assert TASK.canonical(p, "2+3+4") == TASK.canonical(p, "(2+3)+4")
    assert TASK.canonical(p, "(3+2)+4") == TASK.canonical(p, "4+(2+3)")
    assert TASK.canonical(p, "2+(3+4)") != TASK.canonical(p, "(2+3)+4")


def _brute_force(problem):
    """All chains: repeatedly combine two pool items (any order, any op) and canonicalize."""
    found = set()

    def go(pool):
        for i, j in itertools.permutations(range(len(pool)), 2):
            x, y = pool[i], pool[j]
            for op in cd.OPS:
                vx, vy = Fraction(x.value), Fraction(y.value)
                exact = {"+": vx + vy, "-": vx - vy, "*": vx * vy, "/": vy and vx / vy}[op]
                if exact <= 0 or exact.denominator != 1:
                    continue
                e = cd.combine(op, x, y)
                assert e is not None and e.value == exact
                if e.value == problem.target:
                    found.add(e.text)
                go([q for k, q in enumerate(pool) if k not in (i, j)] + [e])

    go([cd.leaf(v) for v in problem.numbers])
    return sorted(found)


@pytest.mark.parametrize(
    "numbers,target",
    [((3, 5, 7), 22), ((2, 2, 3), 6), ((1, 2, 3, 4), 10), ((4, 4, 8, 2), 12), ((6, 3, 9), 2)],
)
def test_solutions_match_brute_force(numbers, target):
    p = cd.CountdownProblem(numbers, target)
    sols = TASK.solutions(p)
    assert sols == _brute_force(p)
    assert len(sols) == len(set(sols))
    for s in sols:
        completion = TASK.render_completion(p, s)
        assert TASK.verify_chain(p, completion), completion
        assert TASK.canonical(p, completion) == s


def test_generation_deterministic_disjoint_and_rich():
    a = TASK.prompts("train", 60, seed=3)
    assert a == TASK.prompts("train", 60, seed=3)
    assert a != TASK.prompts("train", 60, seed=4)
    test = TASK.prompts("test", 60, seed=3)
    assert not {p.key for p in a} & {p.key for p in test}
    assert len({p.key for p in a}) == 60
    assert all(split_of(p.key, TASK.test_fraction) == "test" for p in test)
    counts = [len(TASK.solutions(p)) for p in a]
    assert min(counts) >= TASK.min_solutions and sum(counts) / len(counts) > 4
    for p in a:
        assert 3 <= len(p.numbers) <= 4 and p.target not in p.numbers
        assert set(TASK.render_prompt(p)) <= set("0123456789 ->:")


def test_difficulty_knobs():
    hard = cd.Countdown(num_numbers=(5, 5), number_range=(1, 20), target_range=(100, 200))
    ps = hard.prompts("train", 2, seed=0)
    assert all(len(p.numbers) == 5 and 100 <= p.target <= 200 for p in ps)
    with pytest.raises(ValueError):
        TASK.prompts("validation", 1, seed=0)


def test_a_split_holds_what_count_says_and_asking_for_more_fails_at_once():
    small = cd.Countdown(num_numbers=(3, 3), number_range=(1, 6), target_range=(10, 30),
                         min_solutions=2)
    n = small.count("train")
    every = [cd.CountdownProblem(nums, t)
             for nums in itertools.combinations_with_replacement(range(1, 7), 3)
             for t in range(10, 31) if t not in nums]  # fmt: skip
    assert 20 < n and n + small.count("test") == sum(len(small.solutions(p)) >= 2 for p in every)
    assert len({p.key for p in small.prompts("train", n, seed=0)}) == n  # every one is reachable
    with pytest.raises(ValueError, match=f"asked for {n + 1} train problems, but these knobs "
                                         f"have only {n}"):  # fmt: skip
        small.prompts("train", n + 1, seed=0)  # after 20 (n + 11) draws, not 1000 (n + 11)
    assert cd.Countdown(num_numbers=(3, 5), number_range=(1, 40)).count("train") is None


def test_narrow_slices_and_sft_pairs():
    sols = TASK.solutions(cd.CountdownProblem((2, 3, 4, 6), 12))
    assert cd.select_solutions(sols, "all") == sols
    assert cd.select_solutions(sols, "first") == [min(sols)]
    plus = cd.select_solutions(sols, "first_op:+")
    assert plus and all(cd.first_op(s) == "+" for s in plus)
    with pytest.raises(ValueError):
        cd.select_solutions(sols, "first_op:^")
    problems = TASK.prompts("train", 20, seed=0)
    narrow = cd.sft_pairs(TASK, problems, style="first_op:*", per_problem=2, seed=1)
    assert narrow == cd.sft_pairs(TASK, problems, style="first_op:*", per_problem=2, seed=1)
    assert narrow and all(c[1] == "*" for _, c in narrow)
    full = cd.sft_pairs(TASK, problems, style="all", per_problem=4, seed=1)
    assert len(full) == 80 and len({c for _, c in full}) > 40


def test_render_with_opening_op():
    p = cd.CountdownProblem((2, 3, 4, 6), 11)
    s = "(2*4)+(6-3)"
    assert TASK.canonical(p, s) is not None
    assert cd.opening_ops(s) == {"*", "-"}
    completion = TASK.render_completion(p, TASK.canonical(p, s), opening="-")
    assert completion.startswith("6-3=3,") and TASK.verify_chain(p, completion)
    with pytest.raises(ValueError):
        TASK.render_completion(p, TASK.canonical(p, s), opening="/")
    with pytest.raises(ValueError):
        TASK.render_completion(p, "2+3")


def test_privileged_view_differs_only_in_prefix():
    p = TASK.prompts("train", 1, seed=0)[0]
    s = TASK.solutions(p)[0]
    view = cd.privileged_view(TASK, p, s)
    assert view.teacher_prompt == view.prefix + view.student_prompt
    assert view.student_prompt == TASK.render_prompt(p) and s in view.prefix
    with pytest.raises(ValueError):
        cd.privileged_view(TASK, p, "1+1")
