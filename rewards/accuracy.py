"""Accuracy reward: is the completion's final answer equivalent to the reference?

DeepSeek-R1-Zero's rule-based accuracy reward (DeepSeek-AI 2025, §2.2.2: "the model is required to
provide the final answer in a specified format (e.g., within a box), enabling reliable rule-based
verification"). Scores are 1.0 (equivalent), 0.0 (not, or no answer, or timeout) and None when the
reference itself cannot be read (logged by :func:`rewards.combine`, never silently scored).

Pipeline per completion:
1. extraction in this process (:mod:`rewards.extract`): answer region, boxes, prose;
2. against a plain-number reference, restated arithmetic is not an answer (:func:`stated_value`:
   ``24 + 56`` scores 0, ``24 + 56 = 80`` is judged as 80);
   identical normalized strings -> 1.0; multiple-choice references compare option letters;
3. the fast path (:mod:`rewards.numbers`): both sides plain numbers -> exact ``Fraction`` compare,
   no sympy, no worker;
4. everything else goes to the worker pool (:mod:`rewards.pool`), which parses both sides with our
   own parser (:mod:`rewards.latex`) and compares them with sympy (:mod:`rewards.equivalence`)
   under a hard wall-clock timeout. A timeout scores 0.0 with reason "timeout" and the batch goes on.

Identical (reference, answer) pairs within a batch are judged once. The pool (``DEFAULT_WORKERS``
processes, ``DEFAULT_TIMEOUT_S`` per comparison) starts on first use and is reused; call
:func:`configure` to change it.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

from rewards.extract import (
    MAX_ANSWER_CHARS, answer_region, canonical, choice_letter, final_answer_candidates,
    predicted_choice, reference_answer,
)
from rewards.numbers import (
    PlainNumber, decimal_comma_equal, parse_plain_number, plain_numbers_equal,
)
from rewards.pool import TaskResult, WorkerPool
from rewards.registry import Score, column, completion_text, register, text_item

DEFAULT_WORKERS = 2
DEFAULT_TIMEOUT_S = 3.0
_TASK = "rewards.equivalence:judge"

_pool: WorkerPool | None = None
_NOT_A_NUMBER = re.compile(r"[-+]?nan", re.I)  # a NaN that reached a reference column as text


def configure(workers: int = DEFAULT_WORKERS, timeout_s: float = DEFAULT_TIMEOUT_S,
              memory_mb: int = 2048) -> WorkerPool:
    """Replace the shared comparison pool (the old one is closed); returns the new pool."""
    global _pool
    if _pool is not None:
        _pool.close()
    _pool = WorkerPool(_TASK, workers=workers, timeout_s=timeout_s, memory_mb=memory_mb)
    return _pool


def get_pool() -> WorkerPool:
    """The shared pool, created with the defaults on first use (workers start lazily too)."""
    return _pool if _pool is not None else configure()


# A prepared item is either decided here: (score, reason), or needs the pool: (reference, answers).
_Decided = tuple[Score, str]
_Task = tuple[str, tuple[str, ...]]


@functools.lru_cache(maxsize=4096)
def _reference(ref_raw: str) -> tuple[str, str | None, PlainNumber | None]:
    """(answer, option letter, plain number) of a reference; cached, as a GRPO group repeats it."""
    ref = reference_answer(ref_raw)
    return ref, choice_letter(ref), parse_plain_number(ref)


_ARITH_TOKEN = re.compile(r"\s+|\d+(?:[.,]\d+)*|\\times|\\cdot|\\div|[-+*/×÷·()]")
_LABEL = re.compile(r"\s*[A-Za-z](?:_\{?\w+\}?)?\s*")  # x, a_1
_OTHER_RELATIONS = re.compile(r"[<>≤≥≠]|\\(?:le|ge|leq|geq|neq|ne|approx)\b")


def is_arithmetic(text: str) -> bool:
    """Numbers joined by + - × ÷ (at least one operator, brackets allowed): a computation, not a
    stated number (a plain fraction or signed number such as 3/4 or -5 is a number). One linear
    scan, no backtracking: the text is model output."""
    expect_number, depth, operators, pos = True, 0, 0, 0
    for m in _ARITH_TOKEN.finditer(text):
        if m.start() != pos:
            return False  # a character that is neither a number, an operator nor a bracket
        pos, tok = m.end(), m.group()
        if tok.isspace():
            continue
        if tok == "(":
            if not expect_number:
                return False
            depth += 1
        elif tok == ")":
            if expect_number or depth == 0:
                return False
            depth -= 1
        elif tok[0].isdigit():
            if not expect_number:
                return False
            expect_number = False
        elif expect_number:  # a sign before a number
            if tok not in "+-":
                return False
        else:
            operators += 1
            expect_number = True
    return (pos == len(text) and not expect_number and depth == 0 and operators > 0
            and parse_plain_number(text) is None)


def stated_value(answer: str) -> str | None:
    """What an answer states when the reference is a number: sides of an equation chain that only
    restate arithmetic on numbers are work shown, not the answer (`24 + 56 = 80` states 80,
    `x = 5+5+1 = 7` states 7); an answer that is nothing but such arithmetic (`24 + 56`, which a
    model rewarded by symbolic equivalence learns to copy from the question) states nothing: None.
    Anything else comes back unchanged."""
    if is_arithmetic(answer):
        return None
    if "=" not in answer or _OTHER_RELATIONS.search(answer):
        return answer
    inner = answer.strip()
    while inner.startswith("(") and inner.endswith(")"):  # (35 + 70 = 105)
        inner = inner[1:-1].strip()
    sides = inner.split("=")
    if any(side.count("(") != side.count(")") for side in sides):
        return answer  # "=" inside brackets: not a top-level chain
    i = 0
    while i < len(sides) - 1 and _LABEL.fullmatch(sides[i]):
        i += 1
    if not is_arithmetic(sides[i]):
        return answer
    while i < len(sides) - 1 and is_arithmetic(sides[i]):
        i += 1
    return None if is_arithmetic(sides[i]) else "=".join(sides[i:]).strip()


def _prepare(region: str | None, reference: Any) -> _Decided | _Task:
    if reference is None:
        return None, "no reference answer"
    if isinstance(reference, float) and not math.isfinite(reference):
        return None, f"reference is {reference}, not an answer"
    ref, letter, ref_number = _reference(reference if isinstance(reference, str) else str(reference))
    if not ref:
        return None, "no reference answer"
    if _NOT_A_NUMBER.fullmatch(ref):
        return None, f"reference is {ref!r}, not an answer"
    if len(ref) > MAX_ANSWER_CHARS:
        return None, "reference too long"
    if letter is not None:
        picked = predicted_choice(region) if region is not None else None
        if picked is None:
            return 0.0, "no option letter"
        if picked != letter:
            return 0.0, f"option {picked}, not {letter}"
        return 1.0, f"option {picked}"
    if region is None:
        return 0.0, "no answer (missing or unclosed tags)"
    cands = [c for c in final_answer_candidates(region) if c]
    if not cands:
        return 0.0, "empty answer"
    if any(len(c) > MAX_ANSWER_CHARS for c in cands):
        return 0.0, "answer too long"
    if len(cands) == 1 and ref_number is not None:
        stated = stated_value(cands[0])
        if stated is None:
            return 0.0, "unevaluated arithmetic: the answer restates a computation, not its value"
        cands = [stated]
    if len(cands) == 1:
        if canonical(cands[0]) == canonical(ref):
            return 1.0, "identical"
        cand_number = parse_plain_number(cands[0])
        if ref_number is not None and cand_number is not None:
            if plain_numbers_equal(ref_number, cand_number):
                return 1.0, "equal numbers"
            return 0.0, "different numbers"
        if decimal_comma_equal(ref, ref_number, cands[0], cand_number):
            return 1.0, "equal numbers (decimal comma)"
    elif ref_number is not None:
        return 0.0, "several different boxed answers"
    return ref, tuple(cands)


def _from_result(result: TaskResult) -> _Decided:
    if result.status == "ok":
        verdict, reason = result.value
        return (None if verdict is None else float(verdict)), reason
    if result.status == "timeout":
        return 0.0, "timeout"
    return 0.0, f"{result.status}: {result.detail}"


def _judge_all(items: list[_Decided | _Task], pool: WorkerPool | None) -> list[_Decided]:
    tasks: dict[_Task, int] = {}
    for item in items:
        if isinstance(item[1], tuple):
            tasks.setdefault(item, len(tasks))  # type: ignore[arg-type]
    verdicts: list[_Decided] = []
    if tasks:
        results = (pool or get_pool()).map(list(tasks))
        verdicts = [_from_result(r) for r in results]
    return [verdicts[tasks[it]] if isinstance(it[1], tuple) else it  # type: ignore[index]
            for it in items]


@text_item
def accuracy_item(completion: str, answer: Any = None, **_: Any) -> tuple[Score, str]:
    """Score one completion against its reference answer; returns (score, reason)."""
    return _judge_all([_prepare(answer_region(completion), answer)], None)[0]


def verify(reference: Any, answer_text: str, pool: WorkerPool | None = None) -> tuple[Score, str]:
    """Compare an answer text (no tags needed: prose, a box, a bare expression) with a reference."""
    return _judge_all([_prepare(answer_text, reference)], pool)[0]


def accuracy_reward(completions: list[str], answer: Any = None, **columns: Any) -> list[Score]:
    """1.0 when the final answer is equivalent to ``answer[i]``, else 0.0; None if unjudgeable."""
    return [s for s, _ in accuracy_details(completions, answer=answer, **columns)]


def reference_column(columns: dict[str, Any]) -> Any:
    """The references when the dataset names them otherwise than ``answer``: open-r1's
    ``solution`` (a worked solution: its last box is the answer), ``ground_truth``, or verl's
    ``reward_model`` struct (``{"ground_truth": ...}`` per row)."""
    for name in ("solution", "ground_truth"):
        if columns.get(name) is not None:
            return columns[name]
    rm = columns.get("reward_model")
    if isinstance(rm, dict):
        return rm.get("ground_truth")
    if isinstance(rm, (list, tuple)):
        return [r.get("ground_truth") if isinstance(r, dict) else None for r in rm]
    return None


def accuracy_details(completions: list[str], answer: Any = None, pool: WorkerPool | None = None,
                     **columns: Any) -> list[tuple[Score, str]]:
    """(score, reason) for every completion; the batch form of :func:`accuracy_item`."""
    if answer is None:
        answer = reference_column(columns)
    if answer is None:
        raise ValueError("accuracy reward needs the 'answer' column (one reference per completion); "
                         "'solution', 'ground_truth' or verl's 'reward_model' also work")
    refs = column({"answer": answer}, "answer", len(completions), None)
    items = [_prepare_completion(c, r) for c, r in zip(completions, refs)]
    return _judge_all(items, pool)


def _prepare_completion(completion: Any, reference: Any) -> _Decided | _Task:
    text = completion_text(completion)
    if text is None:
        return 0.0, f"completion is {type(completion).__name__}, not text"
    return _prepare(answer_region(text), reference)


accuracy_reward = register("accuracy", accuracy_item)(accuracy_reward)
