"""Language-consistency reward (rewards.language): share of target-language words in the CoT."""
from __future__ import annotations

import pytest

from rewards import language_consistency_reward
from rewards.language import (
    MIN_WORDS, NEUTRAL, chain_of_thought, language_consistency_item, script_word_counts,
)


def cot(body: str) -> str:
    return f"<think>{body}</think><answer>1</answer>"


CASES = [
    ("english-in-english", cot("first we add the two numbers and then we check"), "en", 1.0),
    ("chinese-in-english", cot("我们需要计算这个值然后检查结果"), "en", 0.0),
    ("chinese-in-chinese", cot("我们需要计算这个值然后检查结果"), "zh", 1.0),
    ("english-in-chinese", cot("first we add the two numbers and then we check"), "zh", 0.0),
    # 6 English words, 4 Han characters (one word each)
    ("mixed", cot("we add the two numbers now 然后检查"), "en", 6 / 10),
    ("mixed-zh-target", cot("we add the two numbers now 然后检查"), "zh", 4 / 10),
    ("math-skipped", cot("so $x^2 + 3x = 10$ and \\frac{a}{b} gives the final value here"), "en", 1.0),
    ("numbers-and-variables-skipped", cot("12 + 7 = 19 x y z 然后我们检查结果"), "zh", 1.0),
    ("latex-commands-skipped", cot("计算 \\sqrt{2} \\cdot \\pi 然后检查结果"), "zh", 1.0),
    ("too-few-words-neutral", cot("x = 3"), "en", NEUTRAL),
    ("too-few-words-neutral-zh", cot("ok"), "zh", NEUTRAL),
    ("empty-cot-neutral", cot(""), "en", NEUTRAL),
    ("russian", cot("сначала сложим два числа и проверим"), "ru", 1.0),
    ("russian-in-english", cot("сначала сложим два числа и проверим"), "en", 0.0),
    ("japanese-kana-and-kanji", cot("まず計算します。次に確認します。"), "ja", 1.0),
    ("korean", cot("먼저 두 수를 더한 다음 확인합니다 그리고 끝"), "ko", 1.0),
    ("greek-single-letter-variable", cot("let θ be the angle so we compute the sine"), "en", 1.0),
    ("accented-latin-counts-as-latin", cot("la réponse est très évidente ici donc"), "fr", 1.0),
    ("locale-code", cot("我们需要计算这个值然后检查结果"), "zh-CN", 1.0),
    ("unknown-language", cot("hello there my friend how are you"), "xx", None),
    ("unclosed-think-is-cot", "<think>we add the two numbers and then 检查", "en", 7 / 9),
    ("no-think-tags-whole-text", "we add the two numbers and then check", "en", 1.0),
    ("answer-not-scored", "<think>we add the two numbers and check</think><answer>答案是五</answer>", "en", 1.0),
]


@pytest.mark.parametrize(("completion", "language", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_language_consistency(completion, language, expected):
    score, reason = language_consistency_item(completion, language)
    if expected is None:
        assert score is None, reason
    else:
        assert score == pytest.approx(expected), reason


def test_batch_uses_per_row_language_and_default_english():
    completions = [cot("we add the two numbers and check"), cot("我们需要计算这个值然后检查结果")]
    assert language_consistency_reward(completions) == [1.0, 0.0]
    assert language_consistency_reward(completions, language=["en", "zh"]) == [1.0, 1.0]
    assert language_consistency_reward(completions, language="zh") == [0.0, 1.0]


def test_neutral_and_threshold_are_configurable():
    short = cot("we add")
    assert language_consistency_reward([short], neutral=0.5) == [0.5]
    assert language_consistency_reward([short], min_words=1) == [1.0]


def test_word_counting_by_script():
    counts = script_word_counts("hello world 你好 Привет θ x こんにちは 한국어")
    assert counts == {"latin": 2, "han": 2, "cyrillic": 1, "kana": 5, "hangul": 1}


def test_chain_of_thought_boundaries():
    assert chain_of_thought("<think>a</think>b") == "a"
    assert chain_of_thought("a</think>b") == "a"
    assert chain_of_thought("<think>a") == "a"
    assert chain_of_thought("plain") == "plain"


def test_defaults_are_documented_values():
    assert MIN_WORDS == 5 and NEUTRAL == 1.0
