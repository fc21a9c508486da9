"""Countdown's arithmetic: canonical expression trees over + - * /, their parser, and the
complete set of expressions a multiset of numbers can build (used by `countdown` and `steer`).

Rules (classic Countdown): each given number is used at most once; every intermediate and final
value is a positive integer (so `a - b` needs a > b and `a / b` needs b | a).

Canonical form: operands of + and * in a fixed order (leaves before subexpressions, then by
value, then by text) and every subexpression parenthesized, so commutative reorderings share one
text while re-associations ((a+b)+c vs a+(b+c)) do not.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter

OPS = "+-*/"
_TOKEN = re.compile(r"\d+|[-+*/()]")
_MAX_ANSWER_CHARS = 200  # bounds the parser's recursion on adversarial output


@dataclasses.dataclass(frozen=True)
class Expr:
    """A node of an expression tree with its canonical text; leaves have op None."""

    value: int
    text: str
    op: str | None = None
    left: Expr | None = None
    right: Expr | None = None

    @property
    def wrapped(self) -> str:
        return self.text if self.op is None else f"({self.text})"


def leaf(value: int) -> Expr:
    return Expr(value, str(value))


def _order(e: Expr) -> tuple:
    return (e.op is not None, e.value, e.wrapped)


def combine(op: str, x: Expr, y: Expr) -> Expr | None:
    """x op y in canonical form, or None if the rules forbid it (non-positive or inexact)."""
    if op == "+":
        value = x.value + y.value
    elif op == "*":
        value = x.value * y.value
    elif op == "-":
        value = x.value - y.value
    elif op == "/":
        if y.value == 0 or x.value % y.value:
            return None
        value = x.value // y.value
    else:
        raise ValueError(f"unknown operation {op!r}")
    if value <= 0:
        return None
    if op in "+*" and _order(y) < _order(x):
        x, y = y, x
    return Expr(value, f"{x.wrapped}{op}{y.wrapped}", op, x, y)


def leaves(e: Expr) -> list[int]:
    return [e.value] if e.op is None else leaves(e.left) + leaves(e.right)


def steps(e: Expr) -> list[Expr]:
    """Internal nodes in post-order (left subtree, right subtree, node): a valid chain order."""
    return [] if e.op is None else steps(e.left) + steps(e.right) + [e]


def parse_expression(text: str) -> Expr | None:
    """Parse + - * / and parentheses over non-negative integers (usual precedence, left
    associative) into a canonical tree; None if malformed or if a rule is broken on the way."""
    text = text.replace(" ", "")
    if not text or len(text) > _MAX_ANSWER_CHARS:
        return None
    tokens = _TOKEN.findall(text)
    if "".join(tokens) != text:
        return None
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def binary(sub, ops: str) -> Expr | None:
        nonlocal pos
        node = sub()
        while node is not None and peek() is not None and peek() in ops:
            op = tokens[pos]
            pos += 1
            rhs = sub()
            node = None if rhs is None else combine(op, node, rhs)
        return node

    def factor() -> Expr | None:
        nonlocal pos
        tok = peek()
        if tok is None:
            return None
        pos += 1
        if tok == "(":
            node = binary(term, "+-")
            if node is None or peek() != ")":
                return None
            pos += 1
            return node
        return leaf(int(tok)) if tok.isdigit() and len(tok) <= 9 else None

    def term() -> Expr | None:
        return binary(factor, "*/")

    node = binary(term, "+-")
    return node if node is not None and pos == len(tokens) else None


def uses_available(numbers: tuple[int, ...], used: list[int]) -> bool:
    have = Counter(numbers)
    return all(have[v] >= k for v, k in Counter(used).items())


@functools.lru_cache(maxsize=4096)
def reachable(numbers: tuple[int, ...]) -> dict[int, frozenset[str]]:
    """Every value reachable from `numbers` (sorted) under the rules -> the canonical texts of the
    expressions reaching it. Subset DP: trees over a multiset = an op over two disjoint parts."""
    n = len(numbers)
    by_mask: dict[int, dict[str, Expr]] = {1 << i: {str(v): leaf(v)} for i, v in enumerate(numbers)}
    for mask in sorted(range(1, 1 << n), key=lambda m: bin(m).count("1")):
        if mask in by_mask:
            continue
        found: dict[str, Expr] = {}
        sub = (mask - 1) & mask
        while sub:
            rest = mask ^ sub
            if sub < rest:  # each unordered split once; both operand orders are tried below
                for x in by_mask[sub].values():
                    for y in by_mask[rest].values():
                        for op, a, b in (("+", x, y), ("*", x, y), ("-", x, y), ("-", y, x),
                                         ("/", x, y), ("/", y, x)):  # fmt: skip
                            e = combine(op, a, b)
                            if e is not None:
                                found.setdefault(e.text, e)
            sub = (sub - 1) & mask
        by_mask[mask] = found
    out: dict[int, set[str]] = {}
    for exprs in by_mask.values():
        for e in exprs.values():
            if e.op is not None:
                out.setdefault(e.value, set()).add(e.text)
    return {v: frozenset(t) for v, t in out.items()}


def first_op(solution: str) -> str | None:
    """Operation of the first step of the canonical chain of `solution` (None if unparseable)."""
    e = parse_expression(solution)
    return None if e is None or e.op is None else steps(e)[0].op


def opening_ops(solution: str) -> frozenset[str]:
    """Operations some valid chain of `solution` can start with: ops of nodes over two leaves."""
    e = parse_expression(solution)
    if e is None:
        return frozenset()
    return frozenset(s.op for s in steps(e) if s.left.op is None and s.right.op is None)
