"""Synthetic arithmetic reasoning tasks: the embedded default's problems and pretraining corpus.

Why this task family
--------------------
The embedded default must show the R1 recipe's effects on a laptop CPU in minutes (issue 8):
a pretrained base with modest accuracy, an inconsistent format and language mixing, which pure RL
(R1-Zero) then sharpens and the language-consistency reward cleans up. So the task needs exact,
cheaply checked answers, traces short enough for a ~3M-parameter model, and difficulty levels that
leave greedy accuracy room to move (the testbed note: 2-3 digit addition alone was too easy, greedy
was already perfect after pretraining).

Six families, three difficulty levels each (example questions in brackets):

- ``add``: 2+2 digits [What is 47 + 85?]; 3 + 2..3 digits; 4 + 3..4 digits.
- ``sub``: 2 - 1..2 digits, never negative [What is 87 - 19?]; 2..3 digits, may be negative;
  3..4 digits, may be negative [What is 187 - 532?].
- ``mul``: 2, 3, then 4 digits times one digit [What is 347 * 6?].
- ``expr``: a +- b +- c with a..c in 1..20; one product (a + b * c, a * b - c) with factors
  2..12; four one-digit numbers with parentheses [What is (2 + 7) * 6 - 4?].
- ``linear``: ax = d or x + b = d [Solve for x: 3x = 12]; ax + b = d with integer x;
  ax + b = cx + d with a > c, x often a fraction [Solve for x: 5x + 3 = 2x + 12].
- ``frac``: same denominator, + or - [What is 1/5 + 2/5?]; different denominators 2..9;
  products or a negative first operand [What is -1/3 - 5/9?].

``add``, ``sub`` and ``mul`` also have a level 0, one-digit operands [What is 7 + 5?, What is 8 - 3?,
What is 6 * 7?]: the slice a 135M-parameter pretrained model (SmolLM2-135M-Instruct) answers
correctly some of the time, so GRPO has a signal to reinforce (measured: 41% of its samples correct
on one-digit addition with the `smollm2-135m` preset's prompt, 0% on two-digit addition).

Reference answers are exact strings in the forms a verifier must handle: integers (``632``),
negatives (``-345``) and reduced fractions with the sign on the numerator (``-3/4``); never
``5/1`` or ``6/8``.

Traces
------
Every step is short and mechanical, so a tiny model can learn it from examples: column arithmetic
digit by digit (each column writes its sum, the carry or borrow, and the answer's digits so far,
so the final answer is a copy, not a reversal); expressions one operation at a time; equations one
transformation at a time; fractions as numerator ("top"), denominator ("bottom"), then a reduction
by the gcd. Each trace ends with ``so X.``. Every arithmetic ``a=b`` in a trace is literally true
(a borrow is written as ``13-1-8=4``), which lets the tests check traces fact by fact. A clean
completion reads::

     <think> 7+5=12 carry 1: 2. 4+8+1=13 carry 1: 32. 3+2+1=6: 632. so 632. </think> <answer> 632 </answer>

Completions stay around 25-75 tokens under a digit-splitting BPE (one token per digit, one per
word or symbol): the tiny model's compute is dominated by sequence length. The digit-by-digit steps
assume the tokenizer splits numbers into single digits (as LLaMA's does); with cl100k-style 3-digit
groups the steps still read but are harder to learn.

Corpus noise (why and how)
--------------------------
R1-Zero started from a base model trained on web data: some worked solutions there are wrong, many
lack any answer format, some mix languages. `build_corpus` renders each corpus problem as exactly
one of four kinds, with configurable shares (exact quotas, shuffled):

- ``clean``: the tagged trace above.
- ``slip``: one computed value is off by one and everything after it follows from the wrong value,
  so the final answer is wrong but consistent with the slip (one false fact in the trace).
- ``untagged``: the same reasoning without ``<think>``/``<answer>``, ending ``answer: X``,
  ``The answer is X.`` or ``#### X``.
- ``drift``: from a random step on, the step words switch to Chinese (进位 carry, 借位 borrow,
  所以 so, 然后 then, 分子/分母 numerator/denominator, ...); the arithmetic stays correct.

Documents are ``User: {question}\\nAssistant:`` followed by the completion (the tokenizer's compact
template; a tagged completion starts with `` <think>``).

Default mix, and the slice the tiny preset uses
-----------------------------------------------
The module's defaults mix all six families uniformly, levels 1/2/3 in proportion 0.3/0.4/0.3, with
25% slip, 25% untagged and 15% drift documents. Measured on this 2-core CPU, that mix is too much
for the tiny preset's budget: the 3M-parameter base reached 5.5% greedy accuracy after 600
pretraining steps (2 minutes), against 87.5% on add levels 1-2 alone. So the `tiny` preset selects
``task_mix = {add = 1}``, ``difficulty_mix = {1: 0.5, 2: 0.5}`` (2-3 digit addition, as in the
testbed note) and keeps the noise: its base then samples the right answer 76% of the time (pass@1
at T=0.6) while only 56% of its completions are well formatted, which is the headroom the RL
stages remove. The other families stay available for longer runs and real models.

All randomness comes from ``random.Random`` instances seeded explicitly: the same seed gives the
same problems, traces and corpus on every machine.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence, Union

from lm.chat_template import TEMPLATES

TASKS: tuple[str, ...] = ("add", "sub", "mul", "expr", "linear", "frac")
DIFFICULTIES: tuple[int, ...] = (1, 2, 3)
# Level 0 (one-digit operands) exists for these families only.
EASY_TASKS: tuple[str, ...] = ("add", "sub", "mul")
LEVELS: tuple[int, ...] = (0, *DIFFICULTIES)
DEFAULT_TASK_MIX: dict[str, float] = {t: 1.0 for t in TASKS}
DEFAULT_DIFFICULTY_MIX: dict[int, float] = {1: 0.3, 2: 0.4, 3: 0.3}
KINDS: tuple[str, ...] = ("clean", "slip", "untagged", "drift")
TARGET_LANGUAGE = "en"

# The tokenizer's compact template for the tiny model (from the one template table); the completion
# follows "Assistant:".
PROMPT_TEMPLATE = TEMPLATES["r1_zero_short"]

# An expression tree: a positive integer leaf or (operator, left, right).
Expr = Union[int, tuple[str, "Expr", "Expr"]]

# Binary operators, on ints and on Fractions alike.
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}

# Step words and their Chinese renderings for drifting traces (longest phrases first).
_ZH = {
    "divide by": "除以",
    "reduce by": "约分",
    "subtract": "减去",
    "add": "加上",
    "carry": "进位",
    "borrow": "借位",
    "first": "先",
    "then": "然后",
    "top": "分子",
    "bottom": "分母",
    "so": "所以",
}
_ZH_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in _ZH) + r")\b")

_UNTAGGED_ENDINGS = ("answer: {a}", "The answer is {a}.", "#### {a}")


@dataclass(frozen=True)
class Problem:
    """One synthetic problem.

    Attributes:
        task: one of TASKS.
        difficulty: 1..3, or None when parsed back from a question (the level is not recoverable).
        spec: the task's operands: (a, b) for add/sub, (a, m) for mul, (tree,) for expr,
            (a, b, c, d) meaning ax + b = cx + d for linear, (p1, q1, op, p2, q2) for frac.
        question: the user-facing question text.
        answer: the exact reference answer (integer or reduced fraction string).
    """

    task: str
    difficulty: int | None
    spec: tuple
    question: str
    answer: str


@dataclass(frozen=True)
class Document:
    """One pretraining document: prompt + completion text, and which kind of noise it carries."""

    text: str
    kind: str


@dataclass(frozen=True)
class CorpusConfig:
    """Shares of noisy documents in the pretraining corpus; the rest are clean.

    The kinds are exclusive: a document is at most one of slip, untagged or drift.
    """

    slip_rate: float = 0.25
    untagged_rate: float = 0.25
    drift_rate: float = 0.15

    def __post_init__(self) -> None:
        rates = (self.slip_rate, self.untagged_rate, self.drift_rate)
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise ValueError(f"corpus noise rates must lie in [0, 1], got {rates}")
        if sum(rates) > 1.0 + 1e-9:
            raise ValueError(f"slip_rate + untagged_rate + drift_rate must be <= 1, got {sum(rates):.3f}")


# ----------------------------------------------------------------------------- answers and numbers


def format_answer(value: Fraction | int) -> str:
    """Canonical answer string: '632', '-345', '-3/4' (reduced, sign on the numerator)."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def render_prompt(question: str) -> str:
    """The compact template the pretraining corpus and the tiny model use."""
    return PROMPT_TEMPLATE.replace("{question}", question)


def _digits(n: int) -> list[int]:
    """Decimal digits of a non-negative integer, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _operand(v: int) -> str:
    """A right-hand operand inside a step: negatives in parentheses (4-(-5), 2*(-3))."""
    return f"({v})" if v < 0 else str(v)


def _term(coef: int) -> str:
    """The x term of a linear equation: 'x', '-x', '3x'."""
    return {1: "x", -1: "-x"}.get(coef, f"{coef}x")


def _side(coef: int, const: int) -> str:
    """One side of a linear equation as written in a question: '3x + 5', 'x - 2', '7'."""
    if coef == 0:
        return str(const)
    if const == 0:
        return _term(coef)
    return f"{_term(coef)} {'+' if const > 0 else '-'} {abs(const)}"


def _compact_side(coef: int, const: int) -> str:
    """The same side inside a step, without spaces: '3x+5', '3x-2'."""
    return _side(coef, const).replace(" ", "")


# --------------------------------------------------------------------------------- expressions


def expr_text(node: Expr, spaced: bool = True) -> str:
    """Render an expression with the fewest parentheses that keep its tree.

    A left child is parenthesised when it binds looser than its parent, a right child when it binds
    no tighter (so ``a - (b + c)`` keeps its parentheses and left-associative chains need none);
    `parse_expr` then rebuilds exactly the same tree.
    """
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    lt, rt = expr_text(left, spaced), expr_text(right, spaced)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        lt = f"({lt})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        rt = f"({rt})"
    return f"{lt} {op} {rt}" if spaced else f"{lt}{op}{rt}"


def expr_value(node: Expr) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    return _OPS[op](expr_value(left), expr_value(right))


_EXPR_TOKEN = re.compile(r"\s*(\d+|[-+*()])")


def parse_expr(text: str) -> Expr:  # safe: our own parser (digits, + - * and parentheses), not sympy's
    """Parse an expression over non-negative integers, + - * and parentheses (no eval).

    Standard precedence, left-associative. Raises ValueError on anything else.
    """
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected character in expression {text!r} at {pos}")
        tokens.append(m.group(1))
        pos = m.end()
    tree, rest = _parse_sum(tokens)
    if rest:
        raise ValueError(f"trailing tokens in expression {text!r}: {rest}")
    return tree


def _parse_sum(tokens: list[str]) -> tuple[Expr, list[str]]:
    node, tokens = _parse_product(tokens)
    while tokens and tokens[0] in "+-":
        op = tokens[0]
        right, tokens = _parse_product(tokens[1:])
        node = (op, node, right)
    return node, tokens


def _parse_product(tokens: list[str]) -> tuple[Expr, list[str]]:
    node, tokens = _parse_atom(tokens)
    while tokens and tokens[0] == "*":
        right, tokens = _parse_atom(tokens[1:])
        node = ("*", node, right)
    return node, tokens


def _parse_atom(tokens: list[str]) -> tuple[Expr, list[str]]:
    if not tokens:
        raise ValueError("expression ends early")
    if tokens[0] == "(":
        node, rest = _parse_sum(tokens[1:])
        if not rest or rest[0] != ")":
            raise ValueError("unbalanced parenthesis")
        return node, rest[1:]
    if tokens[0].isdigit():
        return int(tokens[0]), tokens[1:]
    raise ValueError(f"unexpected token {tokens[0]!r}")


# ----------------------------------------------------------------------------------- generators


def _gen_add(level: int, rng: random.Random) -> tuple[tuple, str, Fraction]:
    lo_a, hi_a, lo_b = {0: (1, 9, 1), 1: (10, 99, 10), 2: (100, 999, 10), 3: (1000, 9999, 100)}[level]
    a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_a)
    if rng.random() < 0.5:
        a, b = b, a
    return (a, b), f"What is {a} + {b}?", Fraction(a + b)


def _gen_sub(level: int, rng: random.Random) -> tuple[tuple, str, Fraction]:
    if level <= 1:  # never negative at levels 0 and 1
        a, b = (rng.randint(1, 9), rng.randint(1, 9)) if level == 0 else (rng.randint(10, 99), rng.randint(1, 99))
        a, b = max(a, b), min(a, b)
    else:
        lo, hi = {2: (10, 999), 3: (100, 9999)}[level]
        a, b = rng.randint(max(lo, hi // 10 + 1), hi), rng.randint(lo, hi)
        if rng.random() < 0.5:
            a, b = b, a
    return (a, b), f"What is {a} - {b}?", Fraction(a - b)


def _gen_mul(level: int, rng: random.Random) -> tuple[tuple, str, Fraction]:
    lo, hi = {0: (2, 9), 1: (10, 99), 2: (100, 999), 3: (1000, 9999)}[level]
    a, m = rng.randint(lo, hi), rng.randint(2, 9)
    return (a, m), f"What is {a} * {m}?", Fraction(a * m)


def _gen_expr(level: int, rng: random.Random) -> tuple[tuple, str, Fraction]:
    pm = lambda: rng.choice("+-")  # noqa: E731
    if level == 1:
        a, b, c = (rng.randint(1, 20) for _ in range(3))
        tree: Expr = (pm(), (pm(), a, b), c)
    elif level == 2:
        a, b, c = (rng.randint(2, 12) for _ in range(3))
        tree = rng.choice([(pm(), a, ("*", b, c)), (pm(), ("*", a, b), c)])
    else:
        a, b, c, d = (rng.randint(1, 9) for _ in range(4))
        tree = rng.choice([
            (pm(), ("*", (pm(), a, b), c), d),
            (pm(), ("*", a, (pm(), b, c)), d),
            ("*", (pm(), a, b), (pm(), c, d)),
            (pm(), a, ("*", (pm(), b, c), d)),
        ])
    return (tree,), f"What is {expr_text(tree)}?", Fraction(expr_value(tree))


def _gen_linear(level: int, rng: random.Random) -> tuple[tuple, str, Fraction]:
    nonzero = lambda lo, hi: rng.choice([v for v in range(lo, hi + 1) if v != 0])  # noqa: E731
    if level == 1:
        if rng.random() < 0.5:
            a, x = rng.randint(2, 12), nonzero(-12, 12)
            a, b, c, d = a, 0, 0, a * x
        else:
            b, x = nonzero(-20, 20), rng.randint(-20, 20)
            a, c, d = 1, 0, x + b
    elif level == 2:
        a, b, x = rng.randint(2, 9), nonzero(-20, 20), rng.randint(-10, 10)
        c, d = 0, a * x + b
    else:
        a = rng.randint(3, 9)
        c = rng.randint(1, a - 1)
        b, d = nonzero(-20, 20), rng.randint(-20, 20)
    question = f"Solve for x: {_side(a, b)} = {_side(c, d)}"
    return (a, b, c, d), question, Fraction(d - b, a - c)


def _gen_frac(level: int, rng: random.Random) -> tuple[tuple, str, Fraction]:
    if level == 1:
        q = rng.randint(2, 12)
        p1, p2, q1, q2, op = rng.randint(1, q - 1), rng.randint(1, q - 1), q, q, rng.choice("+-")
    elif level == 2:
        q1, q2 = rng.sample(range(2, 10), 2)
        p1, p2, op = rng.randint(1, q1 - 1), rng.randint(1, q2 - 1), rng.choice("+-")
    else:
        op = rng.choice("+-*")
        if op == "*":
            q1, q2 = rng.randint(2, 9), rng.randint(2, 9)
            p1, p2 = rng.randint(1, 9), rng.randint(1, 9)
        else:
            q1, q2 = rng.sample(range(2, 10), 2)
            p1, p2 = rng.randint(1, q1 - 1), rng.randint(1, q2 - 1)
        if rng.random() < 0.5:
            p1 = -p1
    value = _OPS[op](Fraction(p1, q1), Fraction(p2, q2))
    return (p1, q1, op, p2, q2), f"What is {p1}/{q1} {op} {p2}/{q2}?", value


_GENERATORS = {
    "add": _gen_add, "sub": _gen_sub, "mul": _gen_mul,
    "expr": _gen_expr, "linear": _gen_linear, "frac": _gen_frac,
}


def generate_problem(task: str, difficulty: int, rng: random.Random) -> Problem:
    """One problem of a task family at a difficulty level (1..3; 0 for EASY_TASKS), drawn from `rng`."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")
    if difficulty not in DIFFICULTIES and not (difficulty == 0 and task in EASY_TASKS):
        raise ValueError(f"difficulty must be one of {DIFFICULTIES} (or 0 for {', '.join(EASY_TASKS)}), "
                         f"got {difficulty!r} for {task!r}")
    spec, question, value = _GENERATORS[task](difficulty, rng)
    return Problem(task, difficulty, spec, question, format_answer(value))


def check_mix(mix: Mapping, allowed: Sequence, what: str) -> tuple[list, list[float]]:
    """Validate a {name: weight} mix; returns the keys with positive weight and their weights."""
    unknown = [k for k in mix if k not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; allowed: {list(allowed)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"{what} weights must be >= 0 with a positive sum, got {dict(mix)}")
    keys = [k for k in allowed if mix.get(k, 0) > 0]
    return keys, [float(mix[k]) for k in keys]


def check_easy_level(tasks: Sequence[str], levels: Sequence[int]) -> None:
    """Level 0 (one-digit operands) can only be drawn with tasks that have it (EASY_TASKS)."""
    if 0 in levels:
        other = [t for t in tasks if t not in EASY_TASKS]
        if other:
            raise ValueError(f"difficulty 0 (one-digit operands) exists only for {', '.join(EASY_TASKS)}; "
                             f"the task mix also has {', '.join(other)}")


_MAX_MISSES = 20_000


def generate_problems(
    n: int,
    seed: int,
    task_mix: Mapping[str, float] | None = None,
    difficulty_mix: Mapping[int, float] | None = None,
    exclude: frozenset[str] | set[str] = frozenset(),
    unique: bool = True,
) -> list[Problem]:
    """Draw `n` problems: task and level by weight, then the operands, all from Random(seed).

    Args:
        exclude: questions never returned (e.g. the test split, kept out of the corpus).
        unique: no question twice. Level-1 families have small spaces (a few hundred to a few
            thousand questions); once a cell is exhausted its draws are rejected, so a very large
            `n` shifts the mix toward roomier cells; 20,000 rejections in a row raise ValueError.
    """
    tasks, task_w = check_mix(task_mix or DEFAULT_TASK_MIX, TASKS, "task")
    levels, level_w = check_mix(difficulty_mix or DEFAULT_DIFFICULTY_MIX, LEVELS, "difficulty")
    check_easy_level(tasks, levels)
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0  # consecutive rejected draws: many in a row means the mix has run out of questions
    while len(out) < n:
        if misses > _MAX_MISSES:
            raise ValueError(
                f"could only draw {len(out)} of {n} distinct problems from this task/difficulty mix; "
                "lower the counts or add harder levels/tasks")
        task = rng.choices(tasks, task_w)[0]
        level = rng.choices(levels, level_w)[0]
        p = generate_problem(task, level, rng)
        if p.question in exclude or (unique and p.question in seen):
            misses += 1
            continue
        misses = 0
        seen.add(p.question)
        out.append(p)
    return out


# -------------------------------------------------------------------------------- question parser

_RE_BINARY = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
_RE_FRAC = re.compile(r"What is (-?\d+)/(\d+) ([-+*]) (\d+)/(\d+)\?")
_RE_EXPR = re.compile(r"What is ([-+*() \d]+)\?")
_RE_LINEAR = re.compile(r"Solve for x: (.+) = (.+)")


def _parse_side(text: str) -> tuple[int, int] | None:
    text = text.strip()
    m = re.fullmatch(r"(-?\d+)", text)
    if m:
        return 0, int(m.group(1))
    m = re.fullmatch(r"(-?\d*)x(?:\s*([-+])\s*(\d+))?", text)
    if m is None:
        return None
    coef = {"": 1, "-": -1}.get(m.group(1), None)
    coef = int(m.group(1)) if coef is None else coef
    const = 0 if m.group(2) is None else int(m.group(3)) * (1 if m.group(2) == "+" else -1)
    return coef, const


def parse_question(question: str) -> Problem | None:
    """Rebuild a Problem (difficulty None) from a question this module wrote; None if not ours.

    Lets later stages (cold-start rewrite, SFT) render the clean trace for a row of
    problems.parquet, which stores only the question and the answer.
    """
    q = question.strip()
    m = _RE_FRAC.fullmatch(q)
    if m:
        p1, q1, op, p2, q2 = int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5])
        if q1 == 0 or q2 == 0:
            return None
        value = _OPS[op](Fraction(p1, q1), Fraction(p2, q2))
        return Problem("frac", None, (p1, q1, op, p2, q2), q, format_answer(value))
    m = _RE_BINARY.fullmatch(q)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        if op == "*" and 2 <= b <= 9 and a >= 2:
            return Problem("mul", None, (a, b), q, format_answer(a * b))
        if op in "+-":
            return Problem("add" if op == "+" else "sub", None, (a, b), q, format_answer(_OPS[op](a, b)))
    m = _RE_EXPR.fullmatch(q)
    if m:
        try:
            tree = parse_expr(m[1])  # safe: the whitelist parser above, never eval
        except ValueError:
            return None
        if isinstance(tree, int):
            return None
        return Problem("expr", None, (tree,), q, format_answer(expr_value(tree)))
    m = _RE_LINEAR.fullmatch(q)
    if m:
        left, right = _parse_side(m[1]), _parse_side(m[2])
        if left is None or right is None or left[0] == right[0]:
            return None
        (a, b), (c, d) = left, right
        return Problem("linear", None, (a, b, c, d), q, format_answer(Fraction(d - b, a - c)))
    return None


# --------------------------------------------------------------------------------------- traces


class _BadSlip(Exception):
    """A slip that would leave the trace meaningless (a negative column sum, a zero denominator)."""


class _Slip:
    """Passes computed values through; perturbs the `at`-th one by `delta` (an arithmetic slip).

    With `at=None` it only counts the computed values (the places a slip can happen).
    """

    def __init__(self, at: int | None = None, delta: int = 0):
        self.at, self.delta, self.sites = at, delta, 0

    def __call__(self, value: int) -> int:
        i, self.sites = self.sites, self.sites + 1
        return value + self.delta if i == self.at else value

    @property
    def slipped(self) -> bool:
        return self.at is not None and self.at < self.sites


def _column_step(terms: str, r: int, carry_word: str, carry: int, partial: str) -> str:
    note = f" {carry_word} {carry}" if carry else ""
    return f"{terms}={r}{note}: {partial}."


def _solve_add(spec: tuple, slip: _Slip) -> tuple[list[str], Fraction]:
    a, b = spec
    da, db = _digits(a), _digits(b)
    n = max(len(da), len(db))
    da, db = da + [0] * (n - len(da)), db + [0] * (n - len(db))
    steps, partial, carry = [], "", 0
    for i in range(n):
        terms = f"{da[i]}+{db[i]}" + (f"+{carry}" if carry else "")
        r = slip(da[i] + db[i] + carry)
        if r < 0:
            raise _BadSlip
        if i < n - 1:
            carry, partial = r // 10, str(r % 10) + partial
            steps.append(_column_step(terms, r, "carry", carry, partial))
        else:  # the last column writes its whole sum
            partial = str(r) + partial
            steps.append(_column_step(terms, r, "carry", 0, partial))
    return steps, Fraction(int(partial))


def _solve_sub(spec: tuple, slip: _Slip) -> tuple[list[str], Fraction]:
    a, b = spec
    steps, sign = [], 1
    big, small = a, b
    if a < b:  # a - b = -(b - a)
        steps.append(f"{a}<{b} so -({b}-{a}).")
        big, small, sign = b, a, -1
    dg, ds = _digits(big), _digits(small)
    ds += [0] * (len(dg) - len(ds))
    partial, borrow = "", 0
    for x, y in zip(dg, ds):
        need = x - borrow < y  # borrow ten from the next column
        lhs = (f"1{x}" if need else f"{x}") + (f"-{borrow}" if borrow else "") + f"-{y}"
        r = slip((10 if need else 0) + x - borrow - y)
        if not 0 <= r <= 9:
            raise _BadSlip
        partial = str(r) + partial
        steps.append(_column_step(lhs, r, "borrow", int(need), partial))
        borrow = int(need)
    return steps, Fraction(sign * int(partial))


def _solve_mul(spec: tuple, slip: _Slip) -> tuple[list[str], Fraction]:
    a, m = spec
    da = _digits(a)
    steps, partial, carry = [], "", 0
    for i, d in enumerate(da):
        terms = f"{d}*{m}" + (f"+{carry}" if carry else "")
        r = slip(d * m + carry)
        if r < 0:
            raise _BadSlip
        if i < len(da) - 1:
            carry, partial = r // 10, str(r % 10) + partial
            steps.append(_column_step(terms, r, "carry", carry, partial))
        else:
            partial = str(r) + partial
            steps.append(_column_step(terms, r, "carry", 0, partial))
    return steps, Fraction(int(partial))


def _solve_expr(spec: tuple, slip: _Slip) -> tuple[list[str], Fraction]:
    steps: list[str] = []

    def ev(node: Expr) -> int:
        if isinstance(node, int):
            return node
        op, left, right = node
        lv, rv = ev(left), ev(right)
        v = slip(_OPS[op](lv, rv))
        steps.append(f"{'then' if steps else 'first'} {lv}{op}{_operand(rv)}={v}.")
        return v

    return steps, Fraction(ev(spec[0]))


def _solve_linear(spec: tuple, slip: _Slip) -> tuple[list[str], Fraction]:
    a, b, c, d = spec
    steps = []
    coef = a
    if c != 0:
        coef = slip(a - c)
        if coef == 0:
            raise _BadSlip
        steps.append(f"subtract {_term(c)}: {a}-{c}={coef}, {_compact_side(coef, b)}={d}.")
    rhs = d
    if b != 0:
        rhs = slip(d - b)
        word, shown = ("subtract", f"{d}-{b}") if b > 0 else ("add", f"{d}+{-b}")
        steps.append(f"{word} {abs(b)}: {_term(coef)}={shown}={rhs}.")
    x = Fraction(rhs, coef)
    if coef != 1:
        if x.denominator == 1:
            x = Fraction(slip(int(x)))
        ratio = f"{rhs}/{coef}" if coef > 0 else f"{rhs}/({coef})"
        shown = ratio if format_answer(x) == ratio else f"{ratio}={format_answer(x)}"
        steps.append(f"divide by {coef}: x={shown}.")
    return steps, x


def _solve_frac(spec: tuple, slip: _Slip) -> tuple[list[str], Fraction]:
    p1, q1, op, p2, q2 = spec
    steps = []
    if op == "*":
        n = slip(p1 * p2)
        steps.append(f"top {p1}*{p2}={n}.")
        d = slip(q1 * q2)
        steps.append(f"bottom {q1}*{q2}={d}.")
    elif q1 == q2:
        n, d = slip(_OPS[op](p1, p2)), q1
        steps.append(f"top {p1}{op}{p2}={n}.")
    else:
        n = slip(_OPS[op](p1 * q2, p2 * q1))
        steps.append(f"top {p1}*{q2}{op}{p2}*{q1}={n}.")
        d = slip(q1 * q2)
        steps.append(f"bottom {q1}*{q2}={d}.")
    if d <= 0:
        raise _BadSlip
    g = math.gcd(n, d)
    value = Fraction(n, d)
    if g > 1:
        steps.append(f"reduce by {g}: {n}/{d}={format_answer(value)}.")
    return steps, value


_SOLVERS = {
    "add": _solve_add, "sub": _solve_sub, "mul": _solve_mul,
    "expr": _solve_expr, "linear": _solve_linear, "frac": _solve_frac,
}


def solution_steps(problem: Problem, slip_at: int | None = None, delta: int = 0) -> tuple[list[str], str]:
    """The worked steps (English, ending with 'so X.') and the final answer they reach.

    Args:
        slip_at: index of the computed value to get wrong (None: a correct trace).
        delta: how far off that value is.

    Raises:
        ValueError: a slip that cannot be rendered meaningfully (see `_BadSlip`).
    """
    slip = _Slip(slip_at, delta)
    try:
        steps, value = _SOLVERS[problem.task](problem.spec, slip)
    except _BadSlip as e:
        raise ValueError(f"slip {slip_at}/{delta} is invalid for {problem.question!r}") from e
    answer = format_answer(value)
    return steps + [f"so {answer}."], answer


def slip_sites(problem: Problem) -> int:
    """How many computed values a trace of this problem has (the places a slip can happen)."""
    slip = _Slip()
    _SOLVERS[problem.task](problem.spec, slip)
    return slip.sites


def slipped_steps(problem: Problem, rng: random.Random) -> tuple[list[str], str] | None:
    """A trace with one arithmetic slip whose final answer differs from the reference.

    Tries every (site, +-1) in a random order; None if none gives a valid, wrong trace.
    """
    options = [(i, dl) for i in range(slip_sites(problem)) for dl in (-1, 1)]
    rng.shuffle(options)
    for at, dl in options:
        try:
            steps, answer = solution_steps(problem, at, dl)
        except ValueError:
            continue
        if answer != problem.answer:
            return steps, answer
    return None


def drift_steps(steps: Sequence[str], start: int) -> list[str]:
    """Steps from index `start` on rendered with Chinese step words (language mixing)."""
    return list(steps[:start]) + [_ZH_RE.sub(lambda m: _ZH[m.group(1)], s) for s in steps[start:]]


def tagged_completion(steps: Sequence[str], answer: str) -> str:
    """R1 format: ' <think> steps </think> <answer> X </answer>' (starts with a space)."""
    return f" <think> {' '.join(steps)} </think> <answer> {answer} </answer>"


def untagged_completion(steps: Sequence[str], answer: str, style: int = 0) -> str:
    """The same reasoning with no tags, ending in a plain answer line like web text."""
    return f" {' '.join(steps)} {_UNTAGGED_ENDINGS[style % len(_UNTAGGED_ENDINGS)].format(a=answer)}"


def render_clean_trace(problem: Problem | str) -> str | None:
    """The clean, readable completion for a problem (or a question this module wrote).

    For SFT and the cold-start rewrite: correct, tagged, English-only. None for a question that
    is not one of ours.
    """
    if isinstance(problem, str):
        parsed = parse_question(problem)
        if parsed is None:
            return None
        problem = parsed
    steps, answer = solution_steps(problem)
    return tagged_completion(steps, answer)


# --------------------------------------------------------------------------------------- corpus


def _kind_quota(n: int, cfg: CorpusConfig, rng: random.Random) -> list[str]:
    counts = {
        "slip": round(n * cfg.slip_rate),
        "untagged": round(n * cfg.untagged_rate),
        "drift": round(n * cfg.drift_rate),
    }
    over = sum(counts.values()) - n
    if over > 0:  # rounding can overshoot by a document or two when the rates sum to 1
        counts["slip"] -= over
    kinds = [k for k, c in counts.items() for _ in range(c)]
    kinds += ["clean"] * (n - len(kinds))
    rng.shuffle(kinds)
    return kinds


def render_document(problem: Problem, kind: str, rng: random.Random) -> Document:
    """One pretraining document of the given kind (see the module docstring).

    A slip that cannot produce a wrong answer (practically never) falls back to a clean document,
    and the returned kind says so.
    """
    prompt = render_prompt(problem.question)
    if kind == "slip":
        slipped = slipped_steps(problem, rng)
        if slipped is not None:
            return Document(prompt + tagged_completion(*slipped), "slip")
        kind = "clean"
    steps, answer = solution_steps(problem)
    if kind == "clean":
        return Document(prompt + tagged_completion(steps, answer), "clean")
    if kind == "untagged":
        return Document(prompt + untagged_completion(steps, answer, rng.randrange(len(_UNTAGGED_ENDINGS))), kind)
    if kind == "drift":
        return Document(prompt + tagged_completion(drift_steps(steps, rng.randrange(len(steps))), answer), kind)
    raise ValueError(f"unknown document kind {kind!r}; the kinds are: {', '.join(KINDS)}")


def build_corpus(problems: Sequence[Problem], cfg: CorpusConfig, seed: int) -> list[Document]:
    """Render one pretraining document per problem, with noise kinds in exact, shuffled quotas.

    Deliberately imperfect like web data (see the module docstring): the base model pretrained on
    it starts with modest accuracy, an inconsistent format and some language mixing, which the RL
    stages then have to fix.
    """
    rng = random.Random(seed)
    kinds = _kind_quota(len(problems), cfg, rng)
    return [render_document(p, k, rng) for p, k in zip(problems, kinds)]
