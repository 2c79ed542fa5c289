"""The plain-number fast path (rewards.numbers): exact Fractions, no sympy."""
from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from rewards.numbers import (
    decimal_comma_equal, parse_plain_number, plain_numbers_equal, rounds_or_truncates_to,
)


@pytest.mark.parametrize(("text", "value", "percent"), [
    ("42", Fraction(42), False),
    ("-7", Fraction(-7), False),
    ("+3", Fraction(3), False),
    ("0.25", Fraction(1, 4), False),
    (".5", Fraction(1, 2), False),
    ("12.", Fraction(12), False),
    ("7,425,000", Fraction(7425000), False),
    ("1 000", Fraction(1000), False),
    ("1,000.5", Fraction(2001, 2), False),
    ("3/4", Fraction(3, 4), False),
    ("\\frac{3}{4}", Fraction(3, 4), False),
    ("\\frac34", Fraction(3, 4), False),
    ("-\\frac{1}{3}", Fraction(-1, 3), False),
    ("\\frac{-1}{3}", Fraction(-1, 3), False),
    ("1 1/2", Fraction(3, 2), False),
    ("2\\frac{5}{8}", Fraction(21, 8), False),
    ("10%", Fraction(10), True),
    ("28 percent", Fraction(28), True),
    ("12.5 pct", Fraction(25, 2), True),
    ("1e3", Fraction(1000), False),  # E-notation (issue 20)
    ("2.5E-4", Fraction(1, 4000), False),
    ("-1.5e+2", Fraction(-150), False),
])
def test_parses(text, value, percent):
    n = parse_plain_number(text)
    assert n is not None and n.value == value and n.percent == percent


@pytest.mark.parametrize("text", [
    "", "x", "1/0", "\\frac{1}{0}", "1,2", "0,111", "2x", "2e", "1.e5", "1e", "e5", "3 4", "1 3/2", "--1", "%",
    "1.2.3", "\\sqrt{2}", "9" * 500,
])
def test_rejects(text):
    assert parse_plain_number(text) is None


def test_decimal_literal_records_its_precision():
    n = parse_plain_number("0.3333")
    assert n.tol == Fraction(1, 10_000) and n.sig == 4


@pytest.mark.parametrize(("ref", "cand", "equal"), [
    ("1/2", "0.5", True),
    ("1/3", "0.3333", True),
    ("1/3", "0.333", True),
    ("1/3", "0.33", False),
    ("2/3", "0.6667", True),
    ("2/3", "0.6666", True),
    ("2/3", "0.6668", False),
    ("1/8", "0.125", True),
    ("1/8", "0.13", False),
    ("10%", "10", True),
    ("10%", "0.1", True),
    ("0.1", "10%", True),
    ("10%", "10%", True),
    ("10%", "0.1%", False),
    ("7", "7.0", True),
    ("-1/3", "-0.3333", True),
])
def test_plain_numbers_equal(ref, cand, equal):
    assert plain_numbers_equal(parse_plain_number(ref), parse_plain_number(cand)) is equal


@pytest.mark.parametrize(("ref", "cand", "equal"), [
    ("1.22", "1,22", True), ("1,22", "1.22", True), ("1000.99", "1000,99", True),
    ("0,111", "0.111", True), ("1.5", "1,000", False), ("1.22", "1,23", False),
])
def test_decimal_comma(ref, cand, equal):
    assert decimal_comma_equal(ref, parse_plain_number(ref), cand, parse_plain_number(cand)) is equal


def test_rounding_and_truncation():
    assert rounds_or_truncates_to(Fraction(125663, 1000), Fraction(1256637, 10000), Fraction(1, 1000))
    assert not rounds_or_truncates_to(Fraction(-1, 3), Fraction(1, 3), Fraction(1))


def test_fast_path_never_imports_sympy():
    code = ("import sys; from rewards import accuracy_reward;"
            "r = accuracy_reward(['<answer>7,425,000</answer>', '<answer>0.5</answer>'],"
            " answer=['7425000', '1/2']);"
            "assert r == [1.0, 1.0], r; assert 'sympy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parents[2])
