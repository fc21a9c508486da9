"""Multi-digit addition with carries: the retention task.

A different skill from Countdown, learned by the base model first and measured again after
post-training on Countdown. Written column by column from the right, carry included:

    prompt      "47+85:"
    completion  "7+5=12,4+8+1=13;132"

Each step is "x+y=s" for the column's digits (0 where a number has run out), with "+1" added
when the previous column carried; the answer after ";" is the sum. There is exactly one
solution, the sum itself, so `solutions()` is that single string.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from jaxpost.tasks import PrivilegedView, Split, check_split, split_of


@dataclasses.dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int

    @property
    def key(self) -> str:
        return f"{min(self.a, self.b)}+{max(self.a, self.b)}"  # a+b and b+a split together


def column_steps(a: int, b: int) -> list[str]:
    """The reference chain: one "x+y(+1)=s" step per column, least significant first."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = s // 10
    return steps


@dataclasses.dataclass(frozen=True)
class Addition:
    """Addition task. Knobs: digits (inclusive range of digits of each operand),
    test_fraction (share of the problem space held out for test)."""

    digits: tuple[int, int] = (2, 3)
    test_fraction: float = 0.2
    name: str = "addition"
    needs_pretrained: ClassVar[bool] = False

    def prompts(self, split: Split, n: int, seed: int) -> list[AdditionProblem]:
        """`n` distinct problems of `split`, each operand with a uniform number of digits."""
        check_split(split)
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        out, seen = [], set()
        for _ in range(200 * (n + 10)):
            if len(out) == n:
                return out
            a, b = (self._number(rng) for _ in range(2))
            p = AdditionProblem(a, b)
            if p.key not in seen and split_of(p.key, self.test_fraction) == split:
                seen.add(p.key)
                out.append(p)
        if len(out) < n:
            raise ValueError(f"could not find {n} distinct {split} problems with {self}")
        return out

    def _number(self, rng: np.random.Generator) -> int:
        d = int(rng.integers(self.digits[0], self.digits[1] + 1))
        return int(rng.integers(10 ** (d - 1) if d > 1 else 0, 10**d))

    def render_prompt(self, problem: AdditionProblem) -> str:
        return f"{problem.a}+{problem.b}:"

    def render_completion(self, problem: AdditionProblem, solution: str) -> str:
        if solution != str(problem.a + problem.b):
            raise ValueError(f"{solution!r} is not {problem.a}+{problem.b}")
        return ",".join(column_steps(problem.a, problem.b)) + f";{solution}"

    def verify_answer(self, problem: AdditionProblem, completion: str) -> bool:
        """The text after the last ";" (or the whole text) is the sum, no leading zeros."""
        answer = completion.strip().rsplit(";", 1)[-1].strip()
        return answer == str(problem.a + problem.b)

    def verify_chain(self, problem: AdditionProblem, completion: str) -> bool:
        """verify_answer, and each column step adds that column's digits and the previous
        column's carry correctly, one step per column."""
        text = completion.strip()
        if ";" not in text or not self.verify_answer(problem, text):
            return False
        # Given the operands every column step is determined, so a correct chain is exactly the
        # reference chain (spaces aside); any wrong digit, carry or column count differs from it.
        chain = text.rsplit(";", 1)[0].replace(" ", "").split(",")
        return chain == column_steps(problem.a, problem.b)

    def canonical(self, problem: AdditionProblem, completion: str) -> str | None:
        return str(problem.a + problem.b) if self.verify_answer(problem, completion) else None

    def solutions(self, problem: AdditionProblem) -> list[str]:
        return [str(problem.a + problem.b)]

    styles = ("all",)

    def sft_examples(self, problems: list[AdditionProblem], *, style: str = "all",
                     per_problem: int = 1, seed: int = 0) -> list[tuple[str, str]]:  # fmt: skip
        """The column-by-column reference of each problem (it has one solution)."""
        if style not in self.styles:
            raise ValueError(f"unknown slice style {style!r} for addition; one of {self.styles}")
        return [(self.render_prompt(p), self.render_completion(p, self.solutions(p)[0]))
                for p in problems]  # fmt: skip

    def privileged_view(self, problem: AdditionProblem, rng=None) -> PrivilegedView:
        """The prompt with the reference chain in context."""
        student = self.render_prompt(problem)
        completion = self.render_completion(problem, self.solutions(problem)[0])
        prefix = f"ref {completion}\n"
        return PrivilegedView(prefix + student, student, prefix, completion)

    def diversity_key(self, problem: AdditionProblem, completion: str) -> str | None:
        return self.canonical(problem, completion)

    def steering(self) -> None:
        return None

    def describe(self) -> str:
        return f"addition of two numbers of {self.digits[0]}-{self.digits[1]} digits"
