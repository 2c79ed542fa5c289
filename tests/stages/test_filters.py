"""R1's readability filters: each check on its own edge cases, then the chain's bookkeeping."""
from __future__ import annotations

import random

import numpy as np
import pytest

from stages import synthetic
from stages.filters import (
    CHECKS, Candidate, DROP_REASONS, FilterParams, FilterSettings, drop_counts, duplicate_flags, filter_record,
    has_code_fence, has_overlong_paragraph, has_repetition_loop, is_language_mixed, jaccard, judge, judge_rows,
    kept_summary, language_ok, length_ok, longest_paragraph, longest_repeat_run, normalize_text, shingles,
    words,
)

CLEAN = " <think> 9+3=12 carry 1: 2. 7+3+1=11 carry 1: 12. so 712. </think> <answer> 712 </answer>"


def test_code_fence() -> None:
    assert has_code_fence("<think> ```python\nprint(1)\n``` </think>")
    assert has_code_fence("~~~\nx\n~~~")
    assert not has_code_fence(CLEAN)
    assert not has_code_fence("a `single` backtick")


def test_overlong_paragraph_counts_text_between_blank_lines() -> None:
    text = "a" * 50 + "\n\n" + "b" * 120 + "\n \n" + "c" * 10
    assert longest_paragraph(text) == 120
    assert has_overlong_paragraph(text, 100)
    assert not has_overlong_paragraph(text, 120)
    # single newlines do not split a paragraph: 60 + 1 + 60 = 121 characters
    assert longest_paragraph("x" * 60 + "\n" + "y" * 60) == 121
    assert longest_paragraph("") == 0


def test_longest_repeat_run_finds_period_and_repeats() -> None:
    # a b c a b c a b c d: block "a b c" three times -> (3 repeats, period 3)
    codes = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    assert longest_repeat_run(codes, 4) == (3, 3)
    assert longest_repeat_run(np.array([0, 1, 2, 3]), 4) == (1, 0)
    assert longest_repeat_run(np.array([5, 5, 5, 5, 5]), 1) == (5, 1)


def test_longest_repeat_run_is_the_same_one_period_at_a_time(monkeypatch) -> None:
    """The all-periods matrix (short texts) and the per-period scan (long ones) agree, planted
    loops, ties between periods and texts shorter than the period included."""
    from stages import filters

    rng = np.random.default_rng(0)
    cases = []
    for _ in range(600):
        codes = rng.integers(0, int(rng.integers(1, 5)), int(rng.integers(0, 120)))
        if rng.random() < 0.5:  # plant a block repeated 2-7 times
            block = rng.integers(0, 9, int(rng.integers(1, 12)))
            at = int(rng.integers(0, len(codes) + 1))
            codes = np.concatenate([codes[:at], np.tile(block, int(rng.integers(2, 8))), codes[at:]])
        cases += [(codes, max_period) for max_period in (1, 4, 16, 32)]
    matrix = [longest_repeat_run(c, m) for c, m in cases]
    monkeypatch.setattr(filters, "REPEAT_MATRIX_MAX_ITEMS", 0)  # every text scanned per period
    assert [longest_repeat_run(c, m) for c, m in cases] == matrix
    assert sum(r >= 3 for r, _ in matrix) > 100  # loops were found, not only (1, 0)


@pytest.mark.parametrize("text", [
    "so 1. so 1. so 1. so 1. so 1. so 1. so 1.",
    " <think> 7+3+1=11 carry 1: 12. 7+3+1=11 carry 1: 12. 7+3+1=11 carry 1: 12.",
    "所以" * 30,                    # a loop in a script written without spaces
    "1" * 60,
    "= 7 " * 20,
])
def test_repetition_loop_detected(text: str) -> None:
    assert has_repetition_loop(text)


def test_repetition_loop_spares_every_synthetic_trace() -> None:
    """Clean and language-drifted traces of 600 synthetic problems: none is a loop."""
    problems = synthetic.generate_problems(600, 3, synthetic.DEFAULT_TASK_MIX, synthetic.DEFAULT_DIFFICULTY_MIX)
    rng = random.Random(0)
    for p in problems:
        steps, answer = synthetic.solution_steps(p)
        drifted = synthetic.drift_steps(steps, rng.randrange(len(steps)))
        for text in (synthetic.tagged_completion(steps, answer), synthetic.tagged_completion(drifted, answer)):
            assert not has_repetition_loop(text), text


def test_length_bounds_and_truncation() -> None:
    assert length_ok(20, "stop", min_tokens=5, max_tokens=20)
    assert not length_ok(21, "stop", min_tokens=5, max_tokens=20)
    assert not length_ok(4, "stop", min_tokens=5, max_tokens=None)
    assert not length_ok(20, "length", min_tokens=5, max_tokens=100)  # cut at max_new_tokens


def test_language_threshold_and_mix_flag() -> None:
    assert language_ok(1.0, 1.0) and not language_ok(0.9, 1.0) and language_ok(0.9, 0.8)
    assert language_ok(None, 1.0)  # nothing to judge cannot be mixed
    assert is_language_mixed(0.99) and not is_language_mixed(1.0) and not is_language_mixed(None)


def test_words_split_numbers_symbols_and_cjk() -> None:
    assert words("abc所以 x=12. 7+5") == ["abc", "所", "以", "x", "=", "12", ".", "7", "+", "5"]


def test_near_duplicates() -> None:
    spaced = CLEAN.replace("so 712.", "SO   712 .")  # case, spacing and a detached period
    other = CLEAN.replace("7+3+1=11 carry 1: 12.", "7+3+1=11 carry 1: 13.").replace("712", "713")
    assert normalize_text("  A\n b ") == "a b"
    assert jaccard(shingles(CLEAN), shingles(spaced)) == 1.0
    assert jaccard(shingles(CLEAN), shingles(other)) < 0.9
    # order matters: the first of a near-identical pair is kept
    assert duplicate_flags([CLEAN, spaced, other, CLEAN.upper()], threshold=0.9) == [False, True, False, True]
    assert jaccard(frozenset(), frozenset()) == 1.0


def test_filter_params_reject_unknown_checks() -> None:
    with pytest.raises(ValueError, match="unknown filter checks"):
        FilterParams(checks=("correct", "vibes"))


def _cand(group: str, text: str, *, answer: str | None = "712", n_tokens: int = 30, finish: str = "stop",
          language: str | None = "en") -> Candidate:
    return Candidate(group=group, completion=text, n_tokens=n_tokens, finish_reason=finish, answer=answer,
                     language=language)


def test_chain_assigns_first_failing_check_dedupes_then_caps() -> None:
    wrong = CLEAN.replace("712", "713")
    untagged = " 9+3=12 carry 1: 2. so 712. The answer is 712."
    fenced = CLEAN.replace("so 712.", "```so 712.```")
    variant = CLEAN.replace("carry 1: 2.", "carry 1: 2 .")  # near-identical to CLEAN
    second = CLEAN.replace("9+3=12 carry 1: 2.", "3+9=12 carry 1: 2.")  # different enough
    third = CLEAN.replace("so 712.", "then 712, so 712.")
    cands = [
        _cand("p", wrong),                  # 0 wrong answer            -> correct
        _cand("p", untagged),               # 1 no tags                 -> format
        _cand("p", CLEAN, finish="length"),  # 2 cut off                 -> length
        _cand("p", fenced),                 # 3 code fence              -> code_fence
        _cand("p", CLEAN),                  # 4 kept
        _cand("p", variant),                # 5 near-duplicate of 4     -> duplicate
        _cand("p", second),                 # 6 kept
        _cand("p", third),                  # 7 third survivor, cap 2   -> over_cap
        _cand("q", CLEAN, answer="712"),    # 8 another prompt: kept (dedupe is per prompt)
    ]
    params = FilterParams(checks=CHECKS, keep_per_prompt=2, max_tokens=64)
    js = judge(cands, params)
    assert [j.drop_reason for j in js] == ["correct", "format", "length", "code_fence", None, "duplicate",
                                          None, "over_cap", None]
    counts = drop_counts(js)
    assert set(counts) == set(DROP_REASONS)
    assert sum(counts.values()) + sum(j.kept for j in js) == len(cands)
    recs = [filter_record(j) for j in js]
    assert all(recs[4][f"pass_{c}"] for c in CHECKS) and recs[4]["drop_reason"] is None  # kept: passed all
    assert recs[0]["pass_correct"] is False and recs[0]["pass_format"] is True
    assert recs[0]["pass_duplicate"] is None  # dedupe only judges samples that passed the rest


def test_chain_records_unapplied_checks_as_none() -> None:
    js = judge([_cand("p", CLEAN, answer=None, language=None)], FilterParams(checks=("correct", "language", "format")))
    assert js[0].kept
    assert js[0].passed["correct"] is None and js[0].passed["language"] is None and js[0].passed["format"] is True
    assert js[0].passed["repetition"] is None


def test_language_check_counts_a_single_foreign_word_by_default() -> None:
    # 所以 = 2 Han words and "carry" = 1 Latin word: 3 words, below the RL reward's 5-word minimum
    short_mix = " <think> 7+5=12 carry 1: 2. 所以 12. </think> <answer> 12 </answer>"
    cand = [_cand("p", short_mix, answer="12")]
    strict = judge(cand, FilterParams(checks=("language",)))
    assert strict[0].drop_reason == "language" and strict[0].language_consistency == pytest.approx(1 / 3)
    lenient = judge(cand, FilterParams(checks=("language",), language_min_words=5))
    assert lenient[0].kept and lenient[0].language_consistency == 1.0  # the reward's neutral value


def test_judge_rows_gives_every_row_one_fate_and_always_measures_correctness() -> None:
    ok = "<think> 2 + 2 = 4 </think> <answer> 4 </answer>"
    wrong = "<think> 2 + 2 = 5 </think> <answer> 5 </answer>"
    rows = [dict(problem_id=p, completion=c, n_tokens=12, finish_reason=f, answer="4", language="en")
            for p, c, f in (("a", ok, "stop"), ("a", wrong, "stop"), ("a", ok, "length"), ("b", "no tags", "stop"))]
    # correctness is not a check here, yet it is measured (pass rates and preference pairs need it)
    kept, counts = judge_rows(rows, FilterParams(checks=("format", "length")), "test")
    assert [r["accuracy"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert [r["drop_reason"] for r in rows] == [None, None, "length", "format"]
    assert kept == rows[:2] and counts["length"] == 1 and counts["format"] == 1
    assert sum(counts.values()) + len(kept) == len(rows)
    summary = kept_summary(rows, kept, n_prompts=2, counts=counts)
    assert summary["candidates"] == 4 and summary["kept"] == 2 and summary["kept_rate"] == 0.5
    assert summary["kept_prompts"] == 1 and summary["dropped_length"] == 1 and summary["dropped_format"] == 1


def test_both_filtering_stages_take_the_chain_settings_from_one_place() -> None:
    from stages import cold_start, rejection_sampling

    shared = set(FilterSettings.model_fields)
    assert shared <= set(cold_start.Config.model_fields) and shared <= set(rejection_sampling.Config.model_fields)
    assert rejection_sampling.Config().checks == list(CHECKS)  # every check on
    assert "paragraph" not in cold_start.Config().checks       # cold_start's narrower default
    assert cold_start.Config(min_tokens=3).filter_params().min_tokens == 3


def test_under_a_prefilled_think_template_the_format_check_counts_the_prompts_tag() -> None:
    """"chat_think" prompts end with <think>: the completion starts inside the block."""
    from stages import rejection_sampling

    body = " 9+3=12 carry 1: 2. 7+3+1=11 carry 1: 12. so 712. </think> <answer> 712 </answer>"
    cands = [_cand("p", body, answer="712"), _cand("q", CLEAN, answer="712")]
    plain = judge(cands, FilterParams(checks=("format",)))
    assert [j.format_score for j in plain] == [0.0, 1.0]
    params = rejection_sampling.Config(template="chat_think", checks=["format"]).filter_params()
    assert params.think_prefilled and not rejection_sampling.Config(template="chat").filter_params().think_prefilled
    prefilled = judge(cands, params)
    assert [j.format_score for j in prefilled] == [1.0, 0.0]  # a second <think> after the prefill is a repeated tag
