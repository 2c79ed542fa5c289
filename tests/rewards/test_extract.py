"""Answer extraction and normalization (rewards.extract), in the calling process."""
from __future__ import annotations

import time

import pytest

from rewards.extract import (
    answer_region, boxed_contents, canonical, choice_letter, final_answer_candidates,
    normalize_answer, predicted_choice, reference_answer,
)


@pytest.mark.parametrize(("completion", "region"), [
    ("<think>a</think><answer>5</answer>", "5"),
    ("<answer>1</answer><answer>2</answer>", "2"),
    ("<think>a</think> tail", " tail"),
    ("plain text", "plain text"),
    ("<think>a</think><answer>5", None),
    ("<think>still thinking", None),
    ("</answer> stray close", None),
    ("", ""),
], ids=["tags", "last-block", "after-think", "no-tags", "unclosed-answer", "unclosed-think",
        "close-without-open", "empty"])
def test_answer_region(completion, region):
    assert answer_region(completion) == region


@pytest.mark.parametrize(("text", "boxes"), [
    ("\\boxed{5}", ["5"]),
    ("\\boxed{\\frac{1}{2}}", ["\\frac{1}{2}"]),
    ("a \\boxed{1} b \\boxed{2}", ["1", "2"]),
    ("\\boxed{\\boxed{3}}", ["\\boxed{3}"]),
    ("\\boxed{\\{1, 2\\}}", ["\\{1, 2\\}"]),
    ("\\boxed{5", []),
    ("\\boxed{ \\boxed{4} ", ["4"]),
    ("\\fbox{7}", ["7"]),
    ("\\boxed {x}", ["x"]),
    ("no box", []),
], ids=["simple", "nested-braces", "two", "box-in-box", "escaped-braces", "unclosed",
        "unclosed-outer", "fbox", "space", "none"])
def test_boxed_contents(text, boxes):
    assert boxed_contents(text) == boxes


def test_boxed_contents_is_linear_on_many_unclosed_boxes():
    text = "\\boxed{" * 50_000
    start = time.perf_counter()
    assert boxed_contents(text) == []
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("raw", "normalized"), [
    ("$\\dfrac{1}{2}$", "\\frac{1}{2}"),
    ("\\left( x \\right)", "( x )"),
    ("\\$10", "10"),
    ("10\\%", "10%"),
    ("6 \\text{ and } 8", "6 , 8"),
    ("(11,7)or(7,11)", "(11,7),(7,11)"),
    ("11,\\! 111", "11111"),
    ("14{,}916", "14,916"),
    ("90^\\circ", "90°"),
    ("\\\\frac{1}{2}", "\\frac{1}{2}"),
    ("-\x0crac{7}{4}", "-\\frac{7}{4}"),
    ("x \u2264 5", "x \\le 5"),
    ("5.", "5"),
    ("\\[ 9 \\]", "9"),
    ("a \\quad b", "a b"),
], ids=["dollars-dfrac", "left-right", "currency", "percent", "text-and", "or", "thin-thousands",
        "braced-comma", "degree", "doubled-backslash", "form-feed", "unicode-le", "period",
        "display-math", "quad"])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(("region", "candidates"), [
    ("42", ["42"]),
    ("The answer is 42.", ["42"]),
    ("so the total is $\\frac{14}{3}$", ["\\frac{14}{3}"]),
    ("\\boxed{5} and \\boxed{5}", ["5"]),
    ("\\boxed{4} or \\boxed{5}", ["4", "5"]),
    ("$1$ and $2$ and $3$", ["1, 2, 3"]),
    ("Final Answer: The largest $n$ is 34.", ["34"]),
    ("so $x+y = 1000$ therefore answer is $1$", ["1"]),
    ("réponse est (35 + 70 = 105).", ["(35 + 70 = 105)"]),
    ("Thus $x <= 2$ is our answer.", ["x <= 2"]),
    ("10 weeks", ["10"]),
    ("   ", []),
], ids=["bare", "keyword", "math-span", "same-boxes", "different-boxes", "joined-spans",
        "keyword-then-number", "keyword-math", "keyword-sentence", "keyword-at-end", "unit-word",
        "blank"])
def test_final_answer_candidates(region, candidates):
    assert final_answer_candidates(region) == candidates


def test_reference_answer_from_worked_solution():
    solution = "Thus $x-p=\\boxed{2-2p}$."
    assert reference_answer(solution) == "2-2p"


def test_canonical_ignores_spacing_and_text_wrappers():
    assert canonical("\\text{Even}") == canonical("Even")
    assert canonical("x + 1") == canonical("x+1")


@pytest.mark.parametrize(("reference", "letter"), [
    ("C", "C"), ("(D) Alina", "D"), ("C Cecile", "C"), ("A Peter\nCelina bum", "A"),
    ("\\text{E}", "E"), ("A + B", None), ("d", None), ("42", None),
])
def test_choice_letter(reference, letter):
    assert choice_letter(reference) == letter


@pytest.mark.parametrize(("region", "letter"), [
    ("thinking about it I think the correct answer is C", "C"),
    ("Let's think. It's not A because, therefore I think it's B", "B"),
    ("The answer is for sure D, it can't be A or B", "D"),
    ("D. it can't be A or B", "D"),
    ("B。 不是 A", "B"),
    ("$\\boxed{\\text{(C)}}$", "C"),
    ("no letter here", None),
])
def test_predicted_choice(region, letter):
    assert predicted_choice(region) == letter


def test_extraction_of_huge_text_is_fast():
    text = ("word $x$ 12 " * 20_000) + "the answer is 5"
    start = time.perf_counter()
    assert final_answer_candidates(text) == ["5"]
    assert time.perf_counter() - start < 1.0
