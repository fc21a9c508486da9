"""GSM8K-style word problems from local files: a numeric final-answer verifier and an
arithmetic chain check.

Sources: local JSONL with one {"question", "answer"} object per line in the GSM8K format (the
answer is the worked solution, with calculator annotations like <<48/2=24>>, then "#### 72"), or
TFDS `gsm8k` from a prepared local data_dir (`GSM8K.from_tfds`, the tfds extra).

    prompt      "Question: <question>\\nAnswer:"
    completion  " <worked solution>\\n#### 72"

Answer: the number after the last "####", or, if there is none, the last number in the
completion; commas, "$" and trailing zeros are ignored, so "1,000", "$1000" and "1000.00" are
the same answer. Chain: every equation the completion states, in calculator annotations
<<expr=value>> or inline "a op b = c", is exact (evaluated in rational arithmetic). A free-text
chain can only be checked this far; a chain with no stated equation passes vacuously.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import ClassVar

import numpy as np

from jaxpost import data
from jaxpost.tasks import PrivilegedView, Split, check_split

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_ANSWER_RE = re.compile(_NUMBER + r"(?:/\d+)?")  # a final answer may be a fraction "3/4"
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_CLAIM = re.compile(r"=\s*(" + _NUMBER + r")")
_HAS_OPERATION = re.compile(r"\d\s*\)?\s*[-+*/]\s*\(?\s*-?\$?\d")
_MAX_EXPRESSION_CHARS = 100
_ARITH_TOKEN = re.compile(r"\d+(?:\.\d+)?|[-+*/()]")


def parse_number(text: str) -> Fraction | None:
    """A number written like "1,000", "$12", "-3.50", "7." or "3/4" as an exact Fraction."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(text) if text and len(text) <= 40 else None
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: "72", "1.5" when the decimal terminates, else "p/q"."""
    if value.denominator == 1:
        return str(value.numerator)
    den, k = value.denominator, 0
    while den % 10 == 0 or den % 2 == 0 or den % 5 == 0:
        den //= 10 if den % 10 == 0 else 2 if den % 2 == 0 else 5
        k += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    scaled = abs(value) * 10**k  # an integer: 10^k is a multiple of the denominator
    digits = str(int(scaled)).rjust(k + 1, "0")
    text = f"{digits[:-k]}.{digits[-k:]}".rstrip("0").rstrip(".")
    return ("-" if value < 0 else "") + text


def final_answer(completion: str) -> Fraction | None:
    """The number after the last "####", else the last number in the text."""
    tail = completion.rsplit("####", 1)[1] if "####" in completion else completion
    numbers = _ANSWER_RE.findall(tail)
    if not numbers:
        return None
    return parse_number(numbers[0] if "####" in completion else numbers[-1])


def evaluate(text: str) -> Fraction | None:
    """Exact value of + - * / arithmetic with parentheses, decimals and unary minus; None if
    malformed, too long, or dividing by zero."""
    text = text.replace(",", "").replace("$", "").replace(" ", "")
    tokens = _ARITH_TOKEN.findall(text)
    if not text or len(text) > 200 or "".join(tokens) != text:
        return None
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def expr():
        nonlocal pos
        value = term()
        while value is not None and peek() in ("+", "-"):
            op, pos = tokens[pos], pos + 1
            rhs = term()
            value = None if rhs is None else value + rhs if op == "+" else value - rhs
        return value

    def term():
        nonlocal pos
        value = unary()
        while value is not None and peek() in ("*", "/"):
            op, pos = tokens[pos], pos + 1
            rhs = unary()
            if rhs is None or (op == "/" and rhs == 0):
                return None
            value = value * rhs if op == "*" else value / rhs
        return value

    def unary():
        nonlocal pos
        tok = peek()
        if tok is None:
            return None
        pos += 1
        if tok == "-":
            inner = unary()
            return None if inner is None else -inner
        if tok == "(":
            value = expr()
            if value is None or peek() != ")":
                return None
            pos += 1
            return value
        return Fraction(tok) if tok[0].isdigit() else None

    value = expr()
    return value if value is not None and pos == len(tokens) else None


def _expression_before(text: str, end: int) -> str:
    """The arithmetic run ending at `end`: digits, $ + - * / ( ) and spaces, with "," and "."
    only between digits (a thousands separator or decimal point, not punctuation)."""
    start = end
    while start > 0 and end - start < _MAX_EXPRESSION_CHARS:
        c = text[start - 1]
        inner = c in ",." and start >= 2 and text[start - 2].isdigit() and text[start].isdigit()
        if not (c in "0123456789$+-*/() " or inner):
            break
        start -= 1
    return text[start:end].lstrip(" +*/)")


def stated_equations(completion: str) -> list[tuple[str, str]]:
    """(expression, claimed value) of every calculator annotation <<expr=value>> and every
    inline equation "a op b ... = c" in the text around them."""
    found = [(m[1], m[2]) for m in _ANNOTATION.finditer(completion)]
    rest = _ANNOTATION.sub(" ", completion)
    for m in _CLAIM.finditer(rest):
        expression = _expression_before(rest, m.start())
        if _HAS_OPERATION.search(expression):
            found.append((expression, m[1]))
    return found


@dataclasses.dataclass(frozen=True)
class GSM8KProblem:
    """A question, its canonical final answer, and the reference worked solution."""

    question: str
    answer: str
    rationale: str = ""


def problem_from_record(record: dict) -> GSM8KProblem:
    """From a GSM8K record {"question", "answer": "<rationale>\\n#### <number>"}."""
    missing = [k for k in ("question", "answer") if not isinstance(record, dict) or k not in record]
    if missing:
        raise ValueError(f"record has no {' or '.join(repr(k) for k in missing)} field (GSM8K "
                         f"records are {{\"question\": ..., \"answer\": \"...#### N\"}})")  # fmt: skip
    rationale, _, tail = str(record["answer"]).rpartition("####")
    value = parse_number(tail)
    if value is None:
        raise ValueError(f"record has no numeric final answer after '####': {record!r}")
    return GSM8KProblem(str(record["question"]).strip(), format_number(value), rationale.strip())


@dataclasses.dataclass(frozen=True)
class GSM8K:
    """The task over fixed train/test problem lists. A train problem whose question also
    appears in test is dropped, so the splits share no prompt."""

    train: tuple[GSM8KProblem, ...]
    test: tuple[GSM8KProblem, ...]
    name: str = "gsm8k"
    needs_pretrained: ClassVar[bool] = True

    def __post_init__(self):
        held_out = {p.question for p in self.test}
        object.__setattr__(
            self, "train", tuple(p for p in self.train if p.question not in held_out)
        )

    @classmethod
    def from_jsonl(cls, train_path: str, test_path: str) -> GSM8K:
        def load(path: str) -> tuple[GSM8KProblem, ...]:
            problems = []
            for line, record in enumerate(data.read_jsonl(path), 1):
                try:
                    problems.append(problem_from_record(record))
                except ValueError as e:
                    raise ValueError(f"{path}, record {line}: {e}") from None
            return tuple(problems)

        return cls(load(train_path), load(test_path))

    @classmethod
    def from_tfds(cls, data_dir: str | None = None, name: str = "gsm8k") -> GSM8K:
        load = lambda split: tuple(
            problem_from_record(r) for r in data.tfds_examples(name, split, data_dir)
        )
        return cls(load("train"), load("test"))

    def prompts(self, split: Split, n: int, seed: int) -> list[GSM8KProblem]:
        """`n` problems of the split in a seeded random order (without replacement)."""
        pool = self.train if check_split(split) == "train" else self.test
        if n > len(pool):
            raise ValueError(f"asked for {n} {split} problems, only {len(pool)} exist")
        order = np.random.default_rng(seed).permutation(len(pool))[:n]
        return [pool[int(i)] for i in order]

    def render_prompt(self, problem: GSM8KProblem) -> str:
        return f"Question: {problem.question}\nAnswer:"

    def render_completion(self, problem: GSM8KProblem, solution: str) -> str:
        if solution != problem.answer:
            raise ValueError(f"{solution!r} is not the answer {problem.answer!r}")
        body = f" {problem.rationale}\n" if problem.rationale else " "
        return f"{body}#### {solution}"

    def verify_answer(self, problem: GSM8KProblem, completion: str) -> bool:
        value = final_answer(completion)
        return value is not None and value == parse_number(problem.answer)

    def verify_chain(self, problem: GSM8KProblem, completion: str) -> bool:
        """verify_answer, and every stated equation is exact."""
        if not self.verify_answer(problem, completion):
            return False
        for expression, claimed in stated_equations(completion):
            value, claim = evaluate(expression), parse_number(claimed)
            if value is None or claim is None or value != claim:
                return False
        return True

    def canonical(self, problem: GSM8KProblem, completion: str) -> str | None:
        """The answer itself: one valid solution per problem, whatever the wording."""
        return problem.answer if self.verify_answer(problem, completion) else None

    def solutions(self, problem: GSM8KProblem) -> list[str]:
        return [problem.answer]

    styles = ("all",)

    def sft_examples(self, problems: list[GSM8KProblem], *, style: str = "all",
                     per_problem: int = 1, seed: int = 0) -> list[tuple[str, str]]:  # fmt: skip
        """The reference worked solution of each problem (one per problem: there is one)."""
        if style not in self.styles:
            raise ValueError(f"unknown slice style {style!r} for gsm8k; one of {self.styles}")
        return [(self.render_prompt(p), self.render_completion(p, p.answer)) for p in problems]

    def privileged_view(self, problem: GSM8KProblem, rng=None) -> PrivilegedView:
        """The prompt with the reference worked solution in context."""
        return privileged_view(self, problem)

    def diversity_key(self, problem: GSM8KProblem, completion: str) -> str | None:
        """Every problem has one answer, so diversity counts reasoning paths of correct ones."""
        return reasoning_path(completion) if self.verify_answer(problem, completion) else None

    def steering(self) -> None:
        return None

    def describe(self) -> str:
        return f"GSM8K, {len(self.train)} train and {len(self.test)} test problems"


def reasoning_path(completion: str) -> str:
    """The identity of a completion's reasoning, for diversity on a one-answer task: the set of
    intermediate values its stated equations claim, then the final answer ("24;72|72"). Two
    correct completions with the same path differ only in wording or step order; "|72" is a
    bare answer."""
    claims = {parse_number(claim) for _, claim in stated_equations(completion)} - {None}
    steps = ";".join(format_number(c) for c in sorted(claims))
    answer = final_answer(completion)
    return f"{steps}|{format_number(answer) if answer is not None else ''}"


def privileged_view(task: GSM8K, problem: GSM8KProblem) -> PrivilegedView:
    """Teacher view with the reference worked solution in context (for OPSD)."""
    student = task.render_prompt(problem)
    completion = task.render_completion(problem, problem.answer)
    prefix = f"Reference solution:{completion}\n"
    return PrivilegedView(prefix + student, student, prefix, completion)
