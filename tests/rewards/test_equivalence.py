"""Symbolic equivalence (rewards.equivalence.judge), called in-process without the pool."""
from __future__ import annotations

import pytest

from rewards.equivalence import is_label, judge
from rewards.extract import normalize_answer
from rewards.latex import parse


def verdict(reference: str, *answers: str):
    return judge(normalize_answer(reference), tuple(normalize_answer(a) for a in answers))


@pytest.mark.parametrize(("reference", "answer", "expected"), [
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt2}{2}", True),
    ("x^2-1", "(x-1)(x+1)", True),
    ("\\sqrt{2}", "1.414", True),  # sqrt 2 truncated to 3 decimals: accepted by policy
    ("\\sqrt{2}", "1.415", False),  # neither rounded nor truncated
    ("\\frac{1}{2^{99}}", "\\frac{1}{2^{98}}", False),
    ("1, 2", "2, 1, 2", True),
    ("(1, 2)", "[1, 2]", False),
    ("x = 2", "x = 2 = 3", True),
    ("2", "x = 3 = 2", False),
    ("k \\ge 2", "2 \\le k", True),
    ("x < 3", "x \\le 3", False),
    ("\\{-1\\} \\cup [0,7)", "\\{-1\\} \\cup [0, 7)", True),
    ("0", "\\frac{1}{0}", False),
    ("12:00", "1:00", False),
])
def test_judge(reference, answer, expected):
    assert verdict(reference, answer)[0] is expected


def test_several_boxes_against_a_single_value():
    assert verdict("5", "4", "5") == (False, "several different boxed answers")


def test_unparseable_reference_is_none():
    ok, reason = verdict("\\sum_k k", "1")
    assert ok is None and reason.startswith("reference unparseable")


def test_unparseable_answer_is_false():
    ok, reason = verdict("1", "@")
    assert ok is False and reason.startswith("answer unparseable")


@pytest.mark.parametrize(("text", "label"), [
    ("x", True), ("f(x)", True), ("|AB|", True), ("V_1:V_2", True), ("(p, q)", True),
    ("2x", False), ("x+y", False), ("x^2", False), ("\\sin(x)", False), ("3", False),
])
def test_is_label(text, label):
    assert is_label(parse(normalize_answer(text))) is label
