"""Labelled (reference, completion, expected) cases for the accuracy reward, one test each.

Expected values follow the policies stated in the module docstrings of rewards.numbers,
rewards.extract and rewards.equivalence; a case that encodes a policy choice says which.
"""
from __future__ import annotations

import pytest

from rewards import accuracy_item


def r1(answer: str) -> str:
    """A well-formed R1 completion whose answer block holds ``answer``."""
    return f"<think>\nLet me work it out.\n</think>\n<answer>\n{answer}\n</answer>"


def boxed(answer: str) -> str:
    return r1(f"The answer is $\\boxed{{{answer}}}$.")


CASES: list[tuple[str, str, str, float | None]] = [
    # --- integers
    ("int-same", "42", r1("42"), 1.0),
    ("int-different", "42", r1("43"), 0.0),
    ("int-plus-sign", "7", r1("+7"), 1.0),
    ("int-leading-zero", "4", r1("004"), 1.0),
    ("int-boxed", "12", boxed("12"), 1.0),
    ("int-dollars", "10", r1("\\$10"), 1.0),
    ("int-math-delimiters", "9", r1("$9$"), 1.0),
    ("int-trailing-period", "9", r1("9."), 1.0),
    ("int-vs-decimal-zero", "1000", r1("1000.0"), 1.0),
    ("int-digit-transposed", "1234", r1("1243"), 0.0),
    ("int-reference-is-int", 5, r1("5"), 1.0),
    # --- decimals
    ("dec-same", "3.14", r1("3.14"), 1.0),
    ("dec-leading-dot", "0.1", r1(".1"), 1.0),
    ("dec-trailing-zeros", "2.50", r1("2.5"), 1.0),
    ("dec-vs-fraction", "0.5", r1("\\frac{1}{2}"), 1.0),
    ("dec-vs-slash-fraction", "0.75", r1("3/4"), 1.0),
    ("dec-different", "0.3", r1("0.33"), 0.0),
    ("dec-finite-value-needs-exact", "0.125", r1("0.13"), 0.0),
    ("dec-sci-notation", "0.0025", r1("2.5 \\times 10^{-3}"), 1.0),
    ("dec-negative", "-0.25", r1("-\\frac14"), 1.0),
    ("dec-long", "16386.20", r1("16386.2"), 1.0),
    # --- fractions
    ("frac-latex", "\\frac{3}{4}", r1("\\frac{3}{4}"), 1.0),
    ("frac-dfrac", "\\frac{3}{4}", r1("\\dfrac{3}{4}"), 1.0),
    ("frac-tfrac-braceless", "\\frac{8}{3}", r1("\\tfrac83"), 1.0),
    ("frac-unreduced", "\\frac{1}{2}", r1("\\frac{2}{4}"), 1.0),
    ("frac-slash-vs-latex", "10/9", r1("\\frac{10}{9}"), 1.0),
    ("frac-different", "\\frac{2}{3}", r1("\\frac{3}{2}"), 0.0),
    ("frac-negative-numerator", "-\\frac{1}{3}", r1("\\frac{-1}{3}"), 1.0),
    ("frac-mixed-number", "\\frac{5}{2}", r1("2\\frac{1}{2}"), 1.0),
    ("frac-mixed-plain", "1.5", r1("1 1/2"), 1.0),
    ("frac-improper-not-mixed", "\\frac{5}{2}", r1("2\\frac{3}{2}"), 0.0),
    ("frac-zero-denominator", "1", r1("1/0"), 0.0),
    ("frac-nested", "\\frac{1}{4}", r1("\\frac{\\frac{1}{2}}{2}"), 1.0),
    ("frac-sum", "\\frac{37}{72}", r1("\\frac{1}{2}+\\frac{1}{72}"), 1.0),
    # --- negatives
    ("neg-same", "-5", r1("-5"), 1.0),
    ("neg-sign-lost", "-5", r1("5"), 0.0),
    ("neg-unicode-minus", "-5", r1("\u22125"), 1.0),
    ("neg-parenthesized", "-3", r1("(-3)"), 1.0),
    ("neg-double", "3", r1("-(-3)"), 1.0),
    ("neg-expression", "-x", r1("-1\\cdot x"), 1.0),
    # --- thousands separators
    ("thousands-comma", "7425000", r1("7,425,000"), 1.0),
    ("thousands-space", "1000", r1("1 000"), 1.0),
    ("thousands-latex-thin", "11111111100", r1("11,\\!111,\\!111,\\!100"), 1.0),
    ("thousands-braced-comma", "14916", r1("14{,}916"), 1.0),
    ("thousands-with-decimals", "1000.99", r1("1,000.99"), 1.0),
    ("thousands-wrong-value", "7425000", r1("7,425,001"), 0.0),
    ("thousands-list-not-number", "32349", r1("32, 349"), 0.0),
    ("thousands-in-reference", "1,000", r1("1000"), 1.0),
    # --- percentages (percent may mean p or p/100)
    ("pct-ref-percent-bare", "10\\%", r1("10"), 1.0),
    ("pct-ref-percent-fraction", "10\\%", r1("0.1"), 1.0),
    ("pct-both", "28\\%", r1("28\\%"), 1.0),
    ("pct-word", "28\\%", r1("28 percent"), 1.0),
    ("pct-plain-sign", "25%", r1("25"), 1.0),
    ("pct-pred-percent-ref-decimal", "0.1", r1("10\\%"), 1.0),
    ("pct-wrong", "10\\%", r1("20"), 0.0),
    ("pct-wrong-fraction", "10\\%", r1("0.2"), 0.0),
    ("pct-decimal-percent", "12.5\\%", r1("12.5%"), 1.0),
    ("pct-boxed", "28\\%", boxed("28\\%"), 1.0),
    # --- simple LaTeX
    ("latex-sqrt", "2\\sqrt{2}", r1("\\sqrt{8}"), 1.0),
    ("latex-sqrt-braceless", "\\sqrt{3}", r1("\\sqrt3"), 1.0),
    ("latex-sqrt-different", "\\sqrt{3}", r1("\\sqrt{2}"), 0.0),
    ("latex-nth-root", "2", r1("\\sqrt[3]{8}"), 1.0),
    ("latex-frac-sqrt", "\\frac{\\sqrt{3}}{2}", r1("\\frac{1}{2}\\sqrt{3}"), 1.0),
    ("latex-rationalized", "\\frac{1}{\\sqrt{2}}", r1("\\frac{\\sqrt{2}}{2}"), 1.0),
    ("latex-pi", "2\\pi", r1("\\pi \\cdot 2"), 1.0),
    ("latex-pi-fraction", "\\frac{9}{4}\\pi", r1("\\frac94\\pi"), 1.0),
    ("latex-pi-vs-number", "\\pi", r1("3"), 0.0),
    ("latex-cdot", "12x", r1("3 \\cdot 4x"), 1.0),  # (against a plain number, 3 \cdot 4 is restated arithmetic)
    ("latex-times", "12y", r1("3 \\times 4y"), 1.0),
    ("latex-left-right", "\\frac{1}{3}", r1("\\left( \\frac{1}{3} \\right)"), 1.0),
    ("latex-power", "1024", r1("2^{10}"), 1.0),
    ("latex-power-braceless", "1024", r1("2^10"), 1.0),
    ("latex-nested-power", "512", r1("2^{3^2}"), 1.0),
    ("latex-double-backslash", "\\frac{1}{2}", r1("\\\\frac{1}{2}"), 1.0),
    ("latex-text-unit", "10", r1("10\\text{ cm}^2"), 1.0),
    ("latex-degrees", "90", r1("90^\\circ"), 1.0),
    ("latex-binom", "10", r1("\\binom{5}{2}"), 1.0),
    ("latex-factorial", "120", r1("5!"), 1.0),
    ("latex-abs", "3", r1("|-3|"), 1.0),
    ("latex-trig-value", "\\frac{1}{2}", r1("\\sin(\\pi/6)"), 1.0),
    ("latex-log", "3", r1("\\log_2 8"), 1.0),
    ("latex-complex", "1+2i", r1("i(2-i)"), 1.0),
    # --- algebraic expressions
    ("alg-expand", "x^2+2x+1", r1("(x+1)^2"), 1.0),
    ("alg-factor", "(x-2)(x+2)", r1("x^2-4"), 1.0),
    ("alg-left-right", "\\left(x-2\\right)\\left(x+2\\right)", r1("(x-2)(x+2)"), 1.0),
    ("alg-commuted", "11z^{7}(5+11z^{7})", r1("11z^7(11z^7+5)"), 1.0),
    ("alg-fraction", "\\frac{8-7x}{6}", r1("4/3-7x/6"), 1.0),
    ("alg-not-equal", "x^2+1", r1("x^2-1"), 0.0),
    ("alg-different-variable", "2x+3", r1("2y+3"), 0.0),
    ("alg-implicit-products", "2^6 \\cdot 3^5 \\cdot 5^4", r1("2^6 3^5 5^4"), 1.0),
    ("alg-trig-identity", "\\tan^2(y)+1", r1("\\sec^2(y)"), 1.0),
    ("alg-sqrt-sum", "\\sqrt{2}+\\sqrt{5}", r1("\\sqrt 5+\\sqrt 2"), 1.0),
    ("alg-rational-function", "\\frac{x+2}{7}", r1("\\frac{x}{7}+\\frac{2}{7}"), 1.0),
    ("alg-missing-term", "(a+5)(b+2)", r1("(+5)(b+2)"), 0.0),
    ("alg-cos-sin-shift", "\\cos(x)", r1("\\sin(90^\\circ - x)"), 1.0),
    ("alg-sec", "\\sec x", r1("\\frac1{\\cos x}"), 1.0),
    ("alg-plus-minus", "1 \\pm \\sqrt{19}", r1("1+\\sqrt{19}, 1-\\sqrt{19}"), 1.0),
    ("alg-plus-minus-one-root", "\\pm 2021", r1("2021"), 0.0),
    # --- tuples, sets, intervals
    ("tuple-same", "(1, 2)", r1("(1,2)"), 1.0),
    ("tuple-order-matters", "(3, 1)", r1("(1, 3)"), 0.0),
    ("tuple-decimal", "(1,\\frac{9}{2})", r1("(1,4.5)"), 1.0),
    ("tuple-length", "(1, 2, 3)", r1("(1, 2)"), 0.0),
    ("set-unordered", "\\{1, 2, 3\\}", r1("\\{3, 1, 2\\}"), 1.0),
    ("set-vs-bare-list", "\\{1, 2\\}", r1("2, 1"), 1.0),
    ("list-unordered-policy", "1, 2, 3", r1("1, 3, 2"), 1.0),
    ("list-missing-element", "1, 2, 3", r1("1, 2"), 0.0),
    ("list-of-tuples", "(2, 2), (1, 3), (3, 3)", r1("(1,3), (3,3), (2,2)"), 1.0),
    ("list-and-connector", "6 \\text{ and } 8", r1("6, 8"), 1.0),
    ("set-symbolic", "\\{x, x - 1\\}", r1("\\{x - 1, x\\}"), 1.0),
    ("interval-same", "[0, 1)", r1("[0,1)"), 1.0),
    ("interval-closedness", "[-3, 2]", r1("(-3, 2)"), 0.0),
    ("interval-infinity", "(1, \\infty)", r1("(1, +\\infty)"), 1.0),
    ("interval-value-form", "[\\frac{1}{2}, \\infty)", r1("[0.5, \\infty)"), 1.0),
    ("interval-union", "(-\\infty, 0) \\cup (0, \\infty)", r1("(0,\\infty)\\cup(-\\infty,0)"), 1.0),
    ("interval-from-inequality", "[-2, 7]", r1("-2 \\le x \\le 7"), 1.0),
    ("interval-in-notation", "[-2, 7]", r1("x \\in [-2,7]"), 1.0),
    ("interval-half-line", "[5, \\infty)", r1("x \\geq 5"), 1.0),
    ("interval-different-endpoint", "[0, 9)", r1("[0, 1)"), 0.0),
    ("matrix-same", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", r1("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}"), 1.0),
    ("matrix-entry-differs", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", r1("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}"), 0.0),
    # --- equations and chains
    ("eq-label-value", "3", r1("x = 3"), 1.0),
    ("eq-label-in-reference", "x = 10", r1("10"), 1.0),
    ("eq-both-labelled", "x = 2", r1("y = 2"), 1.0),
    ("eq-function-label", "f(x) = 2x + 3", r1("2x + 3"), 1.0),
    ("eq-label-wrong-value", "3", r1("x = 4"), 0.0),
    ("eq-chain-first-value", "3", r1("x = 1 + 2 = 3"), 1.0),
    ("eq-chain-skips-restated-arithmetic", "7", r1("x = 5+5+1 = 7"), 1.0),
    ("eq-chain-arithmetic-then-wrong", "80", r1("24 + 56 = 192"), 0.0),
    ("eq-chain-arithmetic-then-right", "80", r1("24 + 56 = 80"), 1.0),
    ("arithmetic-echo-is-no-answer", "80", r1("24 + 56"), 0.0),
    ("arithmetic-echo-times", "12", r1("3 \\times 4"), 0.0),
    ("arithmetic-echo-chain", "80", r1("24 + 56 = 70 + 10"), 0.0),
    ("arithmetic-chain-in-brackets", "105", r1("(35 + 70 = 105)"), 1.0),
    ("power-against-number-still-equivalent", "1024", r1("2^{10}"), 1.0),
    ("eq-chain-hedge-last", "4", r1("x = 3 = 4"), 0.0),
    ("eq-not-label", "0", r1("a + 3z = 0"), 0.0),
    ("eq-proportional", "2x+4y-3=0", r1("-4x-8y+6=0"), 1.0),
    ("eq-different", "5x - 7y + 11z + 4 = 0", r1("x + y - z + 2 = 0"), 0.0),
    ("eq-symbols", "x = y", r1("x = y"), 1.0),
    ("eq-symbols-different", "x = y", r1("x = z"), 0.0),
    ("ineq-flipped", "x < 1", r1("-x > -1"), 1.0),
    ("ineq-direction", "x < 1", r1("x > 1"), 0.0),
    ("ineq-written-reversed", "x \\leq 5", r1("5 \\geq x"), 1.0),
    ("eq-tuple-label", "(3, 2)", r1("(p, q) = (3, 2)"), 1.0),
    ("eq-coordinates", "1, 2, 3", r1("x = 1, y = 2, z = 3"), 1.0),
    # --- exact values, no rounding
    ("exact-tiny-powers", "\\frac{1}{2^{98}}", r1("\\frac{1}{2^{99}}"), 0.0),
    ("exact-tiny-powers-equal", "1/2^{99}", r1("2^{-99}"), 1.0),
    ("exact-large", "2^{100}", r1("1267650600228229401496703205376"), 1.0),
    ("exact-large-off-by-one", "2^{100}", r1("1267650600228229401496703205377"), 0.0),
    ("approx-repeating", "\\frac{1}{3}", r1("0.3333"), 1.0),
    ("approx-too-few-digits", "\\frac{1}{3}", r1("0.33"), 0.0),
    ("approx-wrong-digit", "\\frac{1}{3}", r1("0.3334"), 0.0),
    ("approx-irrational", "\\sqrt{17}", r1("4.1231"), 1.0),
    ("approx-pi", "40\\pi", r1("125.663"), 1.0),
    ("approx-not-accepted-for-finite", "\\frac{1}{8}", r1("0.12"), 0.0),
    ("approx-sci-notation", "\\frac{1}{432}", r1("2.314814814815 \\times 10^{-3}"), 1.0),
    # --- several boxed answers
    ("boxes-same-twice", "5", r1("\\boxed{5} so again \\boxed{5}"), 1.0),
    ("boxes-hedge", "5", r1("\\boxed{4} or maybe \\boxed{5}"), 0.0),
    ("boxes-hedge-symbolic", "\\sqrt{2}", r1("\\boxed{\\sqrt{2}} or \\boxed{\\sqrt{3}}"), 0.0),
    ("boxes-as-list", "1, 2", r1("\\boxed{1} and \\boxed{2}"), 1.0),
    ("boxes-list-wrong-size", "1, 2", r1("\\boxed{1}, \\boxed{2}, \\boxed{3}"), 0.0),
    ("boxes-tuples", "(2, 2), (6, 2)", r1("\\boxed{(2, 2)} and \\boxed{(6, 2)}"), 1.0),
    ("boxes-nested-braces", "\\frac{1}{2}", r1("\\boxed{\\frac{1}{2}}"), 1.0),
    ("boxes-set-with-escaped-braces", "\\{1, 2\\}", r1("\\boxed{\\{1, 2\\}}"), 1.0),
    # --- extraction from the completion
    ("extract-last-answer-block", "5", "<think>a</think><answer>4</answer> <answer>5</answer>", 1.0),
    ("extract-no-tags-boxed", "5", "We get $\\boxed{5}$.", 1.0),
    ("extract-after-think-no-answer-tag", "5", "<think>try 4</think> The answer is 5.", 1.0),
    ("extract-unclosed-answer", "5", "<think>a</think><answer>5", 0.0),
    ("extract-unclosed-think", "5", "<think>the value is 5", 0.0),
    ("extract-empty-answer", "5", "<think>a</think><answer>  </answer>", 0.0),
    ("extract-prose-in-answer", "42", r1("The final answer is 42."), 1.0),
    ("extract-prose-math-span", "\\frac{14}{3}", r1("so the total is $\\frac{14}{3}$"), 1.0),
    ("extract-prose-last-number", "13", r1("3 + 10 = 13 birds in total"), 1.0),
    ("extract-prose-unit", "10", r1("10 weeks"), 1.0),
    ("extract-box-inside-answer-wins", "7", r1("I think 6 but \\boxed{7}"), 1.0),
    ("extract-think-box-ignored", "7", "<think>\\boxed{6}</think><answer>7</answer>", 1.0),
    ("extract-unclosed-box", "5", r1("\\boxed{5"), 0.0),
    ("extract-chinese-prose", "858", r1("因此，弗兰克一共有**858颗**糖果。"), 1.0),
    ("extract-number-glued-to-letters", "2", r1("AZYUK2A"), 0.0),
    # --- text answers, multiple choice
    ("text-same", "\\text{Evelyn}", r1("Evelyn"), 1.0),
    ("text-different", "\\text{Evelyn}", r1("\\text{Carla}"), 0.0),
    ("text-odd", "\\text{odd}", r1("odd"), 1.0),
    ("choice-letter", "C", r1("C"), 1.0),
    ("choice-with-label", "(D) Alina", r1("D"), 1.0),
    ("choice-in-sentence", "B", r1("It is not A, so I think the answer is B"), 1.0),
    ("choice-wrong", "(A) Cecile", r1("C"), 0.0),
    ("choice-boxed-text", "\\text{C}", r1("$\\boxed{\\text{(C)}}$"), 1.0),
    ("base-subscript", "4210_{7}", r1("4210_7"), 1.0),
    ("base-subscript-not-decimal", "204_5", r1("54"), 0.0),
    # --- issue 20: E-notation, a double's printout, NaN/inf references
    ("e-notation", "1000", r1("1e3"), 1.0),
    ("e-notation-reference", "2.5e-4", r1("0.00025"), 1.0),
    ("e-notation-wrong", "1000", r1("1e4"), 0.0),
    ("float-repr-of-sqrt2", "\\sqrt{2}", r1("1.4142135623730951"), 1.0),
    ("float-repr-of-third", "1/3", r1("0.3333333333333333"), 1.0),
    ("float-repr-off-by-far", "\\sqrt{2}", r1("1.4142135623730960"), 0.0),
    ("none-nan-reference", float("nan"), r1("nan"), None),
    ("none-nan-text-reference", "NaN", r1("nan"), None),
    ("none-infinite-reference", float("inf"), r1("inf"), None),
    # --- cannot judge: None, never silently 0
    ("none-missing-reference", None, r1("5"), None),
    ("none-empty-reference", "", r1("5"), None),
    ("none-unparseable-reference", "\\sum_{k=0}^{n} k", r1("5"), None),
    ("none-reference-too-long", "1+" * 1500 + "1", r1("5"), None),
    ("not-none-garbage-answer", "5", r1("@@##"), 0.0),
]


@pytest.mark.parametrize(("reference", "completion", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_accuracy_case(reference, completion, expected):
    score, reason = accuracy_item(completion, answer=reference)
    assert score == expected, reason


def test_case_table_is_large_and_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 150


def test_restated_arithmetic_scan_is_linear_on_hostile_answers():
    """`is_arithmetic` reads model output in one scan: inputs that make a backtracking regex take
    exponential time ('1 +1 +1 ... x') are answered at once (a hang here is the regression)."""
    from rewards.accuracy import is_arithmetic, stated_value
    from rewards.extract import MAX_ANSWER_CHARS

    n = MAX_ANSWER_CHARS
    assert not is_arithmetic(("1 +" * n)[: n - 1] + "x")
    assert is_arithmetic(("1 + " * n)[: n - 3].rstrip(" +") + " + 1")
    assert stated_value("=".join(["1+1"] * (n // 4))) is None
    assert stated_value(("(1" * n)[:n]) == ("(1" * n)[:n]
    assert stated_value("x = 1 - -1 = 2") == "2"
