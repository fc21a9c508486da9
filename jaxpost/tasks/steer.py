"""Steerability probe: Countdown prompts that say which operation the chain must start with.

    prompt      "2 3 4 6 -> 11 first -:"
    completion  "6-3=3,2*4=8,8+3=11;(2*4)+(6-3)"

In-context steerability is whether the policy can still be told *which* of its solutions to
give. The instruction "first <op>" asks for a chain whose first step uses <op>; that step can
only combine two given numbers, so a solution can comply iff its expression tree has a node of
that operation over two leaves (`expressions.opening_ops`). The requested distribution is uniform
over the solutions that can comply, and a problem is only asked about an operation for which
some solutions comply and some do not, so the instruction always matters.

Measure with `metrics.compliance_rate([task.complies(p, c) ...])` and
`metrics.steer_distance([task.compliant_canonical(p, c) ...], task.requested_distribution(p))`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from jaxpost.tasks import Split
from jaxpost.tasks import expressions as ex

if TYPE_CHECKING:  # the probe is built by `Countdown.steering()`, so no import at run time
    from jaxpost.tasks.countdown import Countdown, CountdownProblem


@dataclasses.dataclass(frozen=True)
class SteerProblem:
    base: CountdownProblem
    opening: str  # the requested first operation, one of "+-*/"


@dataclasses.dataclass(frozen=True)
class Steer:
    """The probe over a Countdown generator; verification and solutions are Countdown's."""

    countdown: Countdown
    name: str = "steer"
    needs_pretrained: ClassVar[bool] = False

    def compliant_solutions(self, problem: SteerProblem) -> list[str]:
        """Solutions that some valid chain can start with the requested operation, sorted."""
        return [
            s
            for s in self.countdown.solutions(problem.base)
            if problem.opening in ex.opening_ops(s)
        ]

    def prompts(self, split: Split, n: int, seed: int) -> list[SteerProblem]:
        """Countdown problems of `split`, each with a requested operation drawn uniformly from
        those that split its solution set (some comply, some do not); others are skipped."""
        size = 2 * n + 8
        while size <= 64 * (n + 8):  # the base stream is a prefix-stable function of the seed
            rng = np.random.default_rng([seed, 17])
            out: list[SteerProblem] = []
            for base in self.countdown.prompts(split, size, seed):
                sols = self.countdown.solutions(base)
                counts = {op: sum(op in ex.opening_ops(s) for s in sols) for op in ex.OPS}
                ops = [op for op, k in counts.items() if 0 < k < len(sols)]
                if ops:
                    out.append(SteerProblem(base, ops[int(rng.integers(len(ops)))]))
                if len(out) == n:
                    return out
            size *= 2
        raise ValueError(f"too few Countdown problems admit a steering instruction: {self}")

    def render_prompt(self, problem: SteerProblem) -> str:
        return self.countdown.render_prompt(problem.base)[:-1] + f" first {problem.opening}:"

    def render_completion(self, problem: SteerProblem, solution: str) -> str:
        """The Countdown completion, starting with the requested operation when it can."""
        can = problem.opening in ex.opening_ops(solution)
        opening = problem.opening if can else None
        return self.countdown.render_completion(problem.base, solution, opening=opening)

    def verify_answer(self, problem: SteerProblem, completion: str) -> bool:
        return self.countdown.verify_answer(problem.base, completion)

    def verify_chain(self, problem: SteerProblem, completion: str) -> bool:
        return self.countdown.verify_chain(problem.base, completion)

    def canonical(self, problem: SteerProblem, completion: str) -> str | None:
        return self.countdown.canonical(problem.base, completion)

    def solutions(self, problem: SteerProblem) -> list[str]:
        return self.countdown.solutions(problem.base)

    styles = ("all",)

    def sft_examples(self, problems: list[SteerProblem], *, style: str = "all",
                     per_problem: int = 1, seed: int = 0) -> list[tuple[str, str]]:  # fmt: skip
        """`per_problem` compliant solutions per problem, drawn uniformly (with replacement)."""
        if style not in self.styles:
            raise ValueError(f"unknown slice style {style!r} for steer; one of {self.styles}")
        rng = np.random.default_rng(seed)
        pairs = []
        for p in problems:
            sols = self.compliant_solutions(p)
            for i in rng.integers(0, len(sols), size=per_problem):
                pairs.append((self.render_prompt(p), self.render_completion(p, sols[int(i)])))
        return pairs

    def privileged_view(self, problem: SteerProblem, rng: np.random.Generator):
        return self.countdown.privileged_view(problem.base, rng)

    def diversity_key(self, problem: SteerProblem, completion: str) -> str | None:
        return self.canonical(problem, completion)

    def steering(self) -> None:
        return None

    def describe(self) -> str:
        return f"steering probe over {self.countdown.describe()}"

    def complies(self, problem: SteerProblem, completion: str) -> bool:
        """The chain verifies and its first step uses the requested operation."""
        if not self.verify_chain(problem, completion):
            return False
        first_step = completion.replace(" ", "").strip().split(",", 1)[0]
        return next((ch for ch in first_step[1:] if ch in ex.OPS), None) == problem.opening

    def compliant_canonical(self, problem: SteerProblem, completion: str) -> str | None:
        """The canonical solution if the completion complies, else None (for steer_distance)."""
        return self.canonical(problem, completion) if self.complies(problem, completion) else None

    def requested_distribution(self, problem: SteerProblem) -> dict[str, float]:
        """Uniform over the compliant solutions."""
        sols = self.compliant_solutions(problem)
        return {s: 1.0 / len(sols) for s in sols}
