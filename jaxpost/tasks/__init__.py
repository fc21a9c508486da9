"""Verifiable tasks: prompts, answer and chain verifiers, and complete solution sets.

Every task follows one small protocol (`Task` below), so training loops and evaluation never
special-case a task:

    task.name                                   a short identifier, e.g. "countdown"
    task.prompts(split, n, seed)  -> [Problem]  deterministic in (split, n, seed); the "train" and
                                                "test" splits never share a problem
    task.render_prompt(problem)   -> str        the text the model is conditioned on
    task.render_completion(problem, solution)   the SFT target text for a canonical solution
    task.verify_answer(problem, completion)     the final answer is right (pass@k)
    task.verify_chain(problem, completion)      the answer is right and every intermediate step is
                                                correct and consistent with it (CoT-pass@k)
    task.canonical(problem, completion)         the identity of the solution the completion gives
                                                (equal for solutions that differ only
                                                superficially), or None if it is not a valid one
    task.solutions(problem)       -> [str]      the complete set of valid canonical solutions
                                                where it is finite, sorted
    task.sft_examples(problems, style=, per_problem=, seed=)
                                  -> [(prompt, completion)]  reference solutions as SFT texts;
                                                `style` picks a slice of the solution set
                                                (`task.styles` lists the ones it knows)
    task.privileged_view(problem, rng)          the prompt with a reference solution in context
                                                (OPSD's teacher view), a `PrivilegedView`
    task.diversity_key(problem, completion)     what diversity counts: the identity of a correct
                                                completion's solution (None when it is wrong)
    task.steering()               -> Task|None  a probe of in-context steerability, if the task
                                                has one
    task.describe()               -> str        one line for reports: the task and its knobs
    task.needs_pretrained         (class-level) a model trained here from scratch cannot learn it
                                                (natural language): programs that would build
                                                their own base refuse it

Problems are small frozen (hashable) dataclasses. Completions are untrusted model output: a
malformed completion is simply wrong (False / None), never an exception. The invariant tying the
methods together, checked in the tests:

    verify_answer(p, c)  <=>  canonical(p, c) is not None  <=>  canonical(p, c) in solutions(p)
    verify_chain(p, render_completion(p, s))  for every s in solutions(p)

Train/test splits are decided by a hash of the problem's identity (`split_of`), not by the order
of generation, so they are disjoint for every seed and every n.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable
from typing import ClassVar, Literal, Protocol, TypeVar, runtime_checkable

Split = Literal["train", "test"]
Problem = TypeVar("Problem", bound=Hashable)


@runtime_checkable
class Task(Protocol[Problem]):
    """The verifiable-task protocol; see the module docstring for the contract of each method."""

    name: str
    needs_pretrained: ClassVar[bool]

    def prompts(self, split: Split, n: int, seed: int) -> list[Problem]: ...

    def render_prompt(self, problem: Problem) -> str: ...

    def render_completion(self, problem: Problem, solution: str) -> str: ...

    def verify_answer(self, problem: Problem, completion: str) -> bool: ...

    def verify_chain(self, problem: Problem, completion: str) -> bool: ...

    def canonical(self, problem: Problem, completion: str) -> str | None: ...

    def solutions(self, problem: Problem) -> list[str]: ...

    def sft_examples(self, problems: list[Problem], *, style: str = "all", per_problem: int = 1,
                     seed: int = 0) -> list[tuple[str, str]]: ...  # fmt: skip

    def privileged_view(self, problem: Problem, rng) -> PrivilegedView: ...

    def diversity_key(self, problem: Problem, completion: str) -> Hashable | None: ...

    def steering(self) -> Task | None: ...

    def describe(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class PrivilegedView:
    """The two views of one prompt for on-policy self-distillation (OPSD).

    teacher_prompt == prefix + student_prompt; the completion text is shared, so encoding prompt
    and completion separately gives identical completion tokens in both views (data.pair_batch).
    `completion` is the SFT text of the reference solution shown in the prefix (an SFT example
    (teacher_prompt, completion) teaches a model to read the reference).
    """

    teacher_prompt: str
    student_prompt: str
    prefix: str
    completion: str = ""


def feedback(task: Task, problem, completion: str) -> str:
    """A verifier's message on one attempt, the privileged context of self-distillation from
    feedback: the task's own `feedback(problem, completion)` when it has one (what is wrong with
    the attempt, never the solution), else "correct" or "wrong answer"."""
    own = getattr(task, "feedback", None)
    if own is not None:
        return own(problem, completion)
    return "correct" if task.verify_answer(problem, completion) else "wrong answer"


def split_of(key: str, test_fraction: float) -> Split:
    """The split a problem with identity `key` belongs to: "test" with probability test_fraction.

    u = int(sha256(key)[:8]) / 16^8 is uniform on [0, 1); the problem is in "test" iff
    u < test_fraction. Stable across processes and Python versions (unlike hash()).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if u < test_fraction else "train"


def check_split(split: str) -> Split:
    """Return `split` if it is "train" or "test", else raise ValueError."""
    if split not in ("train", "test"):
        raise ValueError(f'split must be "train" or "test", got {split!r}')
    return split  # type: ignore[return-value]
