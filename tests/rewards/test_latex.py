"""The answer parser (rewards.latex): sympy objects built from a whitelisted token stream."""
from __future__ import annotations

import pytest
import sympy
from sympy import Rational, Symbol, pi, sqrt

from rewards.latex import (
    MAX_CHARS, PERCENT, PLUS_MINUS, Approx, ParseError, Relation, Seq, Text, UnionOf, parse,
)

x, y = Symbol("x"), Symbol("y")


@pytest.mark.parametrize(("text", "value"), [
    ("2x+1", 2 * x + 1),
    ("\\frac{1}{2}", Rational(1, 2)),
    ("\\frac12", Rational(1, 2)),
    ("\\frac{\\sqrt{3}}{2}", sqrt(3) / 2),
    ("\\sqrt[3]{x}", x ** Rational(1, 3)),
    ("x^2", x ** 2),
    ("2^3^2", sympy.Integer(512)),
    ("x**2", x ** 2),
    ("-x^2", -(x ** 2)),
    ("(x-2)(x+2)", (x - 2) * (x + 2)),
    ("2^6 3^5", sympy.Integer(2 ** 6 * 3 ** 5)),
    ("3 \\cdot 4", sympy.Integer(12)),
    ("12 \\div 4", sympy.Integer(3)),
    ("\\pi r^2", pi * Symbol("r") ** 2),
    ("i^2", sympy.Integer(-1)),
    ("x_1 + x_{12}", Symbol("x_1") + Symbol("x_12")),
    ("\\alpha", Symbol("alpha")),
    ("|x|", sympy.Abs(x)),
    ("5!", sympy.Integer(120)),
    ("\\sin^2 x", sympy.sin(x) ** 2),
    ("\\log_2 8", sympy.Integer(3)),
    ("\\sin(30°)", Rational(1, 2)),
    ("10%", 10 * PERCENT),
    ("1 \\pm x", 1 + PLUS_MINUS * x),
    ("4210_7", Symbol("4210_7")),
    ("10 \\text{ cm}", sympy.Integer(10)),
    ("xy", x * y),
    ("\\infty", sympy.oo),
])
def test_parses_to_sympy(text, value):
    assert parse(text) == value


def test_structures():
    assert parse("(1, 2)") == Seq((1, 2), "(", ")")
    assert parse("[0, 1)") == Seq((0, 1), "[", ")")
    assert parse("\\{1, 2\\}") == Seq((1, 2), "{", "}")
    assert parse("1, 2") == Seq((1, 2), "", "")
    assert parse("x = 3") == Relation(("=",), (x, 3))
    assert parse("-2 \\le x < 7") == Relation(("<=", "<"), (-2, x, 7))
    assert parse("[0,1) \\cup (2,3]") == UnionOf((Seq((0, 1), "[", ")"), Seq((2, 3), "(", "]")))
    assert parse("\\text{Evelyn}") == Text("Evelyn")
    assert parse("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}") == sympy.ImmutableMatrix([[1, 2], [3, 4]])
    assert parse("\\emptyset") == Seq((), "{", "}")


def test_decimal_literals_are_exact_and_marked():
    node = parse("0.3333")
    assert isinstance(node, Approx)
    assert node.expr == Rational(3333, 10000) and node.tol == Rational(1, 10000) and node.sig == 4
    sci = parse("2.5 \\times 10^{-3}")
    assert isinstance(sci, Approx) and sci.expr == Rational(1, 400)
    assert not isinstance(parse("0.5x"), Approx)


@pytest.mark.parametrize(("text", "reason"), [
    ("9^9^9^9", "exponent too large"),
    ("10^{10^{10^{10}}}", "exponent too large"),
    ("2^{100000}", "exponent too large"),
    ("(2^{1000})^{1000}", "number too large"),
    ("10000!", "factorial too large"),
    ("(10^{10})!", "factorial too large"),
    ("9" * 401, "number too long"),
    ("(" * 100 + "1" + ")" * 100, "nested too deep"),
    ("x" * (MAX_CHARS + 1), "too long"),
    ("__import__('os')", "unexpected"),
    ("\\boxed{", "unexpected end"),
    ("\\text{abc", "unclosed brace"),
    ("a\x00b", "unexpected character"),
    ("\ud800", "unexpected character"),
    ("\\sum_{k=0}^n k", "unsupported command"),
    ("2 3", "unexpected"),
    ("(1, 2", "unclosed bracket"),
    ("", "empty"),
])
def test_limits_and_errors(text, reason):
    with pytest.raises(ParseError) as err:
        parse(text)
    assert reason in err.value.reason


def test_symbol_names_come_only_from_letters():
    node = parse("a_{n+1}")
    assert node == Symbol("a_n+1")
    assert all(str(s).replace("_", "").replace("+", "").isalnum() for s in node.free_symbols)
