"""Countdown: reach a target from a few numbers with + - * /, showing every step.

Texts are short and use a small alphabet (digits, + - * / = ( ) , ; > and space) so a tiny
character-level model can learn them:

    prompt      "3 5 7 -> 22:"
    completion  "3*5=15,7+15=22;7+(3*5)"

The completion is a chain of steps `a op b = c`, separated by commas, then `;` and the final
expression (the answer). Spaces anywhere in a completion are ignored.

Rules (classic Countdown): each given number is used at most once; every intermediate and final
value is a positive integer (so `a - b` needs a > b and `a / b` needs b | a); a solution uses at
least one operation.

Solution identity (`canonical`): the expression tree, written with the operands of + and * in a
fixed order (leaves before subexpressions, then by value, then by text) and every subexpression
parenthesized. So commutative reorderings (3*5 vs 5*3) and the order in which independent steps
are written are the same solution; re-associations ((a+b)+c vs a+(b+c)) are different solutions,
because they are different computations.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections import Counter
from typing import ClassVar

import numpy as np

from jaxpost.tasks import PrivilegedView, Split, check_split, split_of
from jaxpost.tasks.expressions import (  # noqa: F401  (re-exported: the task's vocabulary)
    OPS,
    Expr,
    combine,
    first_op,
    leaf,
    leaves,
    opening_ops,
    parse_expression,
    reachable,
    steps,
    uses_available,
)
from jaxpost.tasks.steer import Steer

_STEP = re.compile(r"(\d{1,9})([-+*/])(\d{1,9})=(\d{1,9})")


@dataclasses.dataclass(frozen=True)
class CountdownProblem:
    """Numbers (each usable at most once) and the target to reach."""

    numbers: tuple[int, ...]
    target: int

    @property
    def key(self) -> str:
        """Identity for splitting: the multiset of numbers and the target."""
        return ",".join(map(str, sorted(self.numbers))) + f">{self.target}"


def _split_completion(completion: str) -> tuple[str | None, str]:
    text = completion.replace(" ", "").strip()
    if ";" not in text:
        return None, text
    chain, answer = text.rsplit(";", 1)
    return chain, answer


@dataclasses.dataclass(frozen=True)
class Countdown:
    """The Countdown task (see the module docstring). Difficulty knobs:

    Attributes:
      num_numbers: inclusive range of how many numbers a problem has.
      number_range: inclusive range of each number.
      target_range: inclusive range of the target.
      min_solutions: generated problems have at least this many distinct canonical solutions.
      test_fraction: share of the problem space in the test split.
    """

    num_numbers: tuple[int, int] = (3, 4)
    number_range: tuple[int, int] = (1, 12)
    target_range: tuple[int, int] = (10, 60)
    min_solutions: int = 3
    test_fraction: float = 0.2
    name: str = "countdown"
    needs_pretrained: ClassVar[bool] = False

    def prompts(self, split: Split, n: int, seed: int) -> list[CountdownProblem]:
        """`n` distinct problems of `split`, deterministic in (split, n, seed).

        Numbers are drawn uniformly; the target uniformly among the reachable values in
        target_range (not one of the numbers) that have at least min_solutions solutions.
        """
        check_split(split)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        out: list[CountdownProblem] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts == 20 * (n + 10) and (room := self.count(split)) is not None and room < n:
                raise ValueError(f"asked for {n} {split} problems, but these knobs have only "
                                 f"{room}: ask for fewer or widen the number or target range "
                                 f"({self})")  # fmt: skip
            if attempts > 1000 * (n + 10):
                raise ValueError(f"could not find {n} problems with these knobs: {self}")
            k = int(rng.integers(self.num_numbers[0], self.num_numbers[1] + 1))
            nums = tuple(int(v) for v in rng.integers(*self.number_range, size=k, endpoint=True))
            reach = reachable(tuple(sorted(nums)))
            lo, hi = self.target_range
            targets = sorted(
                t
                for t, exprs in reach.items()
                if lo <= t <= hi and t not in nums and len(exprs) >= self.min_solutions
            )
            if not targets:
                continue
            problem = CountdownProblem(nums, targets[int(rng.integers(len(targets)))])
            if problem.key in seen or split_of(problem.key, self.test_fraction) != split:
                continue
            seen.add(problem.key)
            out.append(problem)
        return out

    def count(self, split: Split, limit: int = 5000) -> int | None:
        """How many distinct problems `split` holds (the problem space enumerated), or None when
        it has more than `limit` multisets of numbers (too many to enumerate quickly)."""
        lo, hi = self.number_range
        sizes = range(self.num_numbers[0], self.num_numbers[1] + 1)
        if sum(math.comb(hi - lo + k, k) for k in sizes) > limit:
            return None
        total = 0
        for k in sizes:
            for nums in itertools.combinations_with_replacement(range(lo, hi + 1), k):
                for t, exprs in reachable(nums).items():
                    if (self.target_range[0] <= t <= self.target_range[1] and t not in nums
                            and len(exprs) >= self.min_solutions):  # fmt: skip
                        total += split_of(CountdownProblem(nums, t).key, self.test_fraction) == split
        return total

    def render_prompt(self, problem: CountdownProblem) -> str:
        return " ".join(map(str, problem.numbers)) + f" -> {problem.target}:"

    def render_completion(
        self, problem: CountdownProblem, solution: str, opening: str | None = None
    ) -> str:
        """Chain and answer for a canonical `solution`: its steps in post-order, or, with
        `opening`, starting with a step of that operation over two given numbers."""
        e = parse_expression(solution)
        if e is None or e.op is None or e.value != problem.target:
            raise ValueError(f"{solution!r} is not a solution of {problem}")
        if not uses_available(problem.numbers, leaves(e)):
            raise ValueError(f"{solution!r} uses numbers {problem.numbers} does not have")
        chain = steps(e)
        if opening is not None:
            first = [
                s for s in chain if s.op == opening and s.left.op is None and s.right.op is None
            ]
            if not first:
                raise ValueError(f"no chain of {solution!r} can start with {opening!r}")
            chain = [first[0]] + [s for s in chain if s is not first[0]]
        text = ",".join(f"{s.left.value}{s.op}{s.right.value}={s.value}" for s in chain)
        return f"{text};{e.text}"

    def _judge(self, problem: CountdownProblem, completion: str) -> tuple[Expr | None, str]:
        """(the final expression if it is a solution, else None; the verifier's message)."""
        _, answer = _split_completion(completion)
        e = parse_expression(answer)
        if e is None or e.op is None:
            return None, "no expression"
        if not uses_available(problem.numbers, leaves(e)):
            return None, f"uses numbers not given: {','.join(map(str, leaves(e)))}"
        if e.value != problem.target:
            return None, f"{e.text}={e.value}, not {problem.target}"
        return e, "correct"

    def _answer(self, problem: CountdownProblem, completion: str) -> Expr | None:
        return self._judge(problem, completion)[0]

    def verify_answer(self, problem: CountdownProblem, completion: str) -> bool:
        """The final expression (text after the last `;`, or the whole text if there is none)
        follows the rules, uses only the given numbers, and equals the target."""
        return self._answer(problem, completion) is not None

    def feedback(self, problem: CountdownProblem, completion: str) -> str:
        """The verifier's message on an attempt's final expression: "no expression", the
        numbers it uses that were not given, its value when that misses the target, or
        "correct" (never a solution)."""
        return self._judge(problem, completion)[1]

    def verify_chain(self, problem: CountdownProblem, completion: str) -> bool:
        """verify_answer, and the chain is valid and is the answer's computation: every step is
        exact arithmetic under the rules on values available at that point (given numbers not
        yet used, or earlier results), the last step gives the target, and the steps are, as a
        multiset, exactly the steps of the final expression."""
        chain, _ = _split_completion(completion)
        e = self._answer(problem, completion)
        if chain is None or e is None or not chain:
            return False
        pool = Counter(problem.numbers)
        written = []
        for step in chain.split(","):
            m = _STEP.fullmatch(step)
            if m is None:
                return False
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            pool[a] -= 1
            pool[b] -= 1
            result = combine(op, leaf(a), leaf(b))
            if pool[a] < 0 or pool[b] < 0 or result is None or result.value != c:
                return False
            pool[c] += 1
            written.append(_step_key(op, a, b, c))
        expected = [_step_key(s.op, s.left.value, s.right.value, s.value) for s in steps(e)]
        return written[-1][3] == problem.target and Counter(written) == Counter(expected)

    def canonical(self, problem: CountdownProblem, completion: str) -> str | None:
        """Canonical text of the answer expression if verify_answer holds, else None."""
        e = self._answer(problem, completion)
        return None if e is None else e.text

    def solutions(self, problem: CountdownProblem) -> list[str]:
        """All canonical solutions, sorted: every rule-abiding expression over a sub-multiset of
        the numbers (at least one operation) whose value is the target."""
        return sorted(reachable(tuple(sorted(problem.numbers))).get(problem.target, ()))

    styles = SLICE_STYLES = ("all", "first", "first_op:+", "first_op:-", "first_op:*", "first_op:/")

    def sft_examples(self, problems: list[CountdownProblem], *, style: str = "all",
                     per_problem: int = 1, seed: int = 0) -> list[tuple[str, str]]:  # fmt: skip
        """`sft_pairs`: `per_problem` solutions per problem from the `style` slice."""
        return sft_pairs(self, problems, style=style, per_problem=per_problem, seed=seed)

    def privileged_view(self, problem: CountdownProblem, rng: np.random.Generator) -> PrivilegedView:
        """The prompt with a solution drawn uniformly from the full set in context."""
        sols = self.solutions(problem)
        return privileged_view(self, problem, sols[int(rng.integers(len(sols)))])

    def diversity_key(self, problem: CountdownProblem, completion: str) -> str | None:
        """Distinct solutions are distinct canonical expressions."""
        return self.canonical(problem, completion)

    def steering(self) -> Steer:
        """The "first <op>" probe over this generator (`jaxpost.tasks.steer`)."""
        return Steer(countdown=self)

    def describe(self) -> str:
        lo, hi = self.num_numbers
        count = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return (f"Countdown, {count} numbers in {list(self.number_range)}, targets in "
                f"{list(self.target_range)}, >= {self.min_solutions} solutions")  # fmt: skip


def _step_key(op: str, a: int, b: int, c: int) -> tuple:
    return (op, *sorted((a, b)), c) if op in "+*" else (op, a, b, c)


SLICE_STYLES = Countdown.SLICE_STYLES


def select_solutions(solutions: list[str], style: str) -> list[str]:
    """The slice of a solution set an SFT dataset is drawn from.

    "all": every solution (the full distribution); "first": the lexicographically first
    canonical solution only; "first_op:<op>": solutions whose canonical chain starts with <op>.
    """
    if style == "all":
        return list(solutions)
    if style == "first":
        return sorted(solutions)[:1]
    if style.startswith("first_op:") and style[-1] in OPS and len(style) == 10:
        return [s for s in solutions if first_op(s) == style[-1]]
    raise ValueError(f"unknown slice style {style!r}; one of {SLICE_STYLES}")


def sft_pairs(
    task: Countdown,
    problems: list[CountdownProblem],
    *,
    style: str = "all",
    per_problem: int = 1,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """(prompt, completion) SFT examples: `per_problem` solutions per problem drawn uniformly
    (with replacement) from `select_solutions(task.solutions(p), style)`. Problems whose slice
    is empty are skipped, so a narrow slice trains only on the problems it covers."""
    rng = np.random.default_rng(seed)
    pairs = []
    for p in problems:
        chosen = select_solutions(task.solutions(p), style)
        if not chosen:
            continue
        for i in rng.integers(0, len(chosen), size=per_problem):
            pairs.append((task.render_prompt(p), task.render_completion(p, chosen[int(i)])))
    return pairs


def privileged_view(task: Countdown, problem: CountdownProblem, solution: str) -> PrivilegedView:
    """Teacher view with a reference `solution` in context ("ref <solution>\\n" + prompt)."""
    if solution not in task.solutions(problem):
        raise ValueError(f"{solution!r} is not a canonical solution of {problem}")
    student = task.render_prompt(problem)
    prefix = f"ref {solution}\n"
    return PrivilegedView(prefix + student, student, prefix,
                          task.render_completion(problem, solution))  # fmt: skip
