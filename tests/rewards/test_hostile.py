"""Hostile model output: nothing hangs past the timeout, kills the pool for good, or runs code.

The conftest pool times comparisons out after TEST_TIMEOUT_S (1 s).
"""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import accuracy, accuracy_reward, format_reward, language_consistency_reward
from rewards.accuracy import accuracy_details, accuracy_item

TEST_TIMEOUT_S = 1.0  # must match tests/rewards/conftest.py; checked in test_timeout_matches_conftest
SLACK_S = 4.0  # a shared 2-core machine: start-up of a replacement worker, scheduling noise

# Equal, passes every parse limit, and sympy needs minutes to confirm it: a genuine timeout.
SLOW_REFERENCE = "((a+b+c+d)^2)^{15}"
SLOW_ANSWER = "(a^2+b^2+c^2+d^2+2ab+2ac+2ad+2bc+2bd+2cd)^{15}"


def r1(answer: str) -> str:
    return f"<think>thinking</think><answer>{answer}</answer>"


def code_payloads(canary) -> list[str]:
    return [
        f"__import__('os').system('touch {canary}')",
        f"eval(\"__import__('os').system('touch {canary}')\")",
        f"exec(\"open('{canary}', 'w').close()\")",
        f"\\boxed{{__import__('os').system('touch {canary}')}}",
        f"().__class__.__bases__[0].__subclasses__()",
        "lambda: 0",
        "(lambda: 0)()",
        f"Symbol('x').__class__('{canary}')",
    ]


HOSTILE = {
    "tower-python": "9**9**9**9",
    "tower-latex": "10^{10^{10^{10}}}",
    "unclosed-box": "\\boxed{",
    "many-unclosed-boxes": "\\boxed{" * 20_000,
    "100k-digits": "9" * 100_000,
    "100k-mixed": "x+" * 50_000 + "1",
    "10k-nested-parens": "(" * 10_000 + "1" + ")" * 10_000,
    "deep-but-short": "(" * 900 + "1" + ")" * 900,
    "nested-fracs": "\\frac{" * 300 + "1" + "}{2}" * 300,
    "nul-bytes": "1\x002\x00",
    "lone-surrogate": "\ud800\udfff\ud834",
    "huge-factorial": "100000!",
    "factorial-of-power": "(10^{10})!",
    "factorial-tower": "((100)!)!",
    "huge-binomial": "\\binom{10^{9}}{5 \\cdot 10^{8}}",
    "big-root": "\\sqrt[100000]{2}",
    "division-by-zero": "1/0 - 1/0",
    "unicode-soup": "\u202e\u200b\ufeff\U0001f600=\U0001f600",
    "latex-env-junk": "\\begin{array}{" + "c" * 5000 + "}",
    "matrix-bomb": "\\begin{pmatrix}" + "&".join(["x"] * 900) + "\\end{pmatrix}",
}


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_answer_is_scored_quickly(answer):
    start = time.perf_counter()
    score, reason = accuracy_item(r1(answer), answer="1")
    assert score in (0.0, 1.0), reason
    assert time.perf_counter() - start < TEST_TIMEOUT_S + SLACK_S


@pytest.mark.parametrize("reference", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_reference_is_judged_or_none(reference):
    start = time.perf_counter()
    score, reason = accuracy_item(r1("1"), answer=reference)
    assert score in (0.0, 1.0, None), reason
    assert time.perf_counter() - start < TEST_TIMEOUT_S + SLACK_S


def test_code_in_answers_never_runs(tmp_path):
    canary = tmp_path / "canary"
    payloads = code_payloads(canary)
    completions = [r1(p) for p in payloads] + payloads
    refs = ["1"] * len(completions)
    scores = accuracy_reward(completions, answer=refs)
    scores += accuracy_reward([r1("1")] * len(payloads), answer=payloads)
    format_reward(completions)
    language_consistency_reward(completions)
    assert all(s in (0.0, None) for s in scores)
    time.sleep(0.2)
    assert not canary.exists()


def test_real_timeout_scores_zero_and_pool_survives(fast_pool):
    restarts = fast_pool.restarts
    start = time.perf_counter()
    out = accuracy_details([r1(SLOW_ANSWER), r1("4")], answer=[SLOW_REFERENCE, "2+2"])
    assert out[0] == (0.0, "timeout")
    assert out[1][0] == 1.0
    assert time.perf_counter() - start < TEST_TIMEOUT_S + SLACK_S
    assert fast_pool.restarts == restarts + 1
    assert accuracy_item(r1("\\sqrt{8}"), answer="2\\sqrt{2}") == (1.0, "equivalent")


def test_hostile_batch_is_bounded_by_timeout_times_hostile_over_workers(fast_pool):
    n_hostile = 4
    completions = [r1(SLOW_ANSWER + f"+{i}-{i}") for i in range(n_hostile)]
    refs = [SLOW_REFERENCE] * n_hostile
    completions += [r1(f"\\frac{{{i}}}{{2}}") for i in range(20)]
    refs += [f"{i}/2" if i % 2 else f"\\frac{{{i}\\sqrt{{4}}}}{{4}}" for i in range(20)]
    start = time.perf_counter()
    scores = accuracy_reward(completions, answer=refs)
    elapsed = time.perf_counter() - start
    assert scores[:n_hostile] == [0.0] * n_hostile
    assert scores[n_hostile:] == [1.0] * 20
    bound = TEST_TIMEOUT_S * n_hostile / fast_pool.n_workers
    assert elapsed < bound + SLACK_S


def test_format_and_language_on_hostile_text_are_fast():
    texts = list(HOSTILE.values()) + ["<think>" * 50_000, "</think>" * 50_000 + "$" * 50_000,
                                      "\\(" * 50_000, "<think>" + "中" * 100_000 + "</think>"]
    start = time.perf_counter()
    fmt = format_reward(texts)
    lang = language_consistency_reward(texts)
    assert time.perf_counter() - start < 5.0
    assert all(s in (0.0, 1.0) for s in fmt)
    assert all(s is not None and 0.0 <= s <= 1.0 for s in lang)


# ----------------------------------------------------------------------------- properties

LATEXISH = st.text(alphabet=list("0123456789+-*/^_()[]{}|,.=<>!% xyzi\\fracsqtpilemdo&$"), max_size=60)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=st.text(max_size=200), reference=st.text(max_size=60))
def test_any_text_gives_float_or_none_in_time(answer, reference):
    start = time.perf_counter()
    score, _ = accuracy_item(r1(answer), answer=reference)
    assert score is None or score in (0.0, 1.0)
    assert time.perf_counter() - start < TEST_TIMEOUT_S + SLACK_S


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer=LATEXISH, reference=LATEXISH)
def test_any_latexish_text_gives_float_or_none_in_time(answer, reference):
    start = time.perf_counter()
    score, _ = accuracy_item(r1(answer), answer=reference)
    assert score is None or score in (0.0, 1.0)
    assert time.perf_counter() - start < TEST_TIMEOUT_S + SLACK_S


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=500))
def test_format_and_language_any_text(text):
    assert format_reward([text])[0] in (0.0, 1.0)
    lang = language_consistency_reward([text], language=["zh"])[0]
    assert lang is not None and 0.0 <= lang <= 1.0


def test_timeout_matches_conftest(fast_pool):
    assert fast_pool.timeout_s == TEST_TIMEOUT_S


def test_pool_is_still_healthy_after_the_suite(fast_pool):
    assert accuracy.get_pool() is fast_pool
    assert fast_pool.processes == fast_pool.n_workers + fast_pool.spares
    assert accuracy_item(r1("x^2-1"), answer="(x-1)(x+1)") == (1.0, "equivalent")


# ----------------------------------------------------------------------------- length scaling
# Every regex that sees model output must be linear in its length (issue 20: a run of backslashes
# made `fix_escapes` quadratic, 67 s for 100k characters). Time at n and 4n characters: linear
# code takes ~4x, quadratic ~16x; the bound 8x (+ 50 ms of scheduling noise) separates them.

SCALING_UNITS = ["\\", "{", "}", "\\frac{", "\\boxed{", "$", " ", "\n", "1", "1,", ",", "answer is ",
                 "\\text{", "<think>", "<answer>", "</answer>", "a", "答案", "\\(", "^{", "a ", "\\\\a"]
SCALING_WRAPS = [("", ""), ("<answer>", "</answer>"), ("<think>x</think>", ""), ("", "x")]


def _best_seconds(fn, arg, reps: int = 2) -> float:
    import gc

    best = float("inf")
    gc.disable()  # a collection landing in one timing is not the code's cost
    try:
        for _ in range(reps):
            start = time.perf_counter()
            fn(arg)
            best = min(best, time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def _superlinear(fn, n: int, units=SCALING_UNITS, wraps=SCALING_WRAPS) -> list[str]:
    slow = []
    for unit in units:
        for head, tail in wraps:
            small = head + unit * (n // len(unit)) + tail
            large = head + unit * (4 * n // len(unit)) + tail
            t1, t4 = _best_seconds(fn, small), _best_seconds(fn, large)
            if t4 > 8 * t1 + 0.05:
                slow.append(f"{head}{unit!r}*n{tail}: {t1:.3f}s -> {t4:.3f}s")
    return slow


def _reward_fns():
    from rewards import format_soft_reward, repetition_penalty

    return {
        "accuracy": lambda c: accuracy_details([c], answer=["42"]),
        "format": lambda c: format_reward([c]),
        "format_soft": lambda c: format_soft_reward([c]),
        "language_consistency": lambda c: language_consistency_reward([c]),
        "repetition_penalty": lambda c: repetition_penalty([c]),
    }


@pytest.mark.parametrize("name", ["accuracy", "format", "format_soft", "language_consistency", "repetition_penalty"])
def test_reward_time_is_linear_in_completion_length(name):
    assert _superlinear(_reward_fns()[name], 20_000, wraps=SCALING_WRAPS[1:3]) == []


def test_backslash_run_is_linear():
    """The issue's case: 100k backslashes in an answer took 67.7 s."""
    start = time.perf_counter()
    score, reason = accuracy_item("<answer>" + "\\" * 100_000 + "</answer>", answer="42")
    assert (score, reason) == (0.0, "answer too long")
    assert time.perf_counter() - start < 2.0


def _output_regexes():
    """Compiled patterns of the modules that scan whole completions (rewards.numbers and
    rewards.latex only see an extracted answer, bounded by MAX_DIGITS / MAX_ANSWER_CHARS)."""
    import importlib
    import re

    for module in ("rewards.extract", "rewards.format", "rewards.language", "rewards.penalties",
                   "stages.filters"):
        for name, value in vars(importlib.import_module(module)).items():
            if isinstance(value, re.Pattern):
                yield f"{module}.{name}", value


@pytest.mark.parametrize("name,pattern", list(_output_regexes()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_output_regex_is_linear(name, pattern):
    def scan(text: str) -> None:
        pattern.subn("", text)  # every match the engine finds, without a Python object per match

    assert _superlinear(scan, 10_000, wraps=[("", ""), ("", "x")]) == []


def test_non_text_completions_score_zero_with_a_reason():
    from rewards import ITEM_FORMS, REGISTRY

    for bad in (None, b"<answer>42</answer>", 42, [{"role": "assistant"}]):
        for name, item in ITEM_FORMS.items():
            kwargs = {"answer": "42"} if name == "accuracy" else {}
            assert item(bad, **kwargs) == (0.0, f"completion is {type(bad).__name__}, not text"), name
        for name, fn in REGISTRY.items():
            kwargs = {"answer": ["42"]} if name == "accuracy" else {}
            assert fn([bad], **kwargs) == [0.0], name
    conversational = [{"role": "assistant", "content": "<think>t</think><answer>42</answer>"}]
    assert accuracy_reward([conversational], answer=["42"]) == [1.0]
