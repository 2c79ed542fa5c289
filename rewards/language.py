"""Language-consistency reward: the share of target-language words in the chain of thought.

DeepSeek-R1 §2.3.2: "a language consistency reward during RL training, which is calculated as the
proportion of target language words in the CoT". The paper does not say how words are counted;
here, by Unicode script:

- a word is a run of letters of one script (Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari,
  Hangul, Thai, other); Han and kana count one word per character, since Chinese and Japanese do
  not separate words with spaces;
- the target language maps to its scripts (``en``/``fr``/... -> Latin, ``zh`` -> Han, ``ja`` ->
  Han + kana, ``ru`` -> Cyrillic, ...). Languages sharing a script are not told apart (English and
  French both count as Latin): the reward targets script mixing, the failure the paper describes;
- not scored: numbers, math spans (``$...$``, ``\\(...\\)``, ``\\[...\\]``), LaTeX commands and
  single Latin/Greek/Cyrillic letters (variables such as ``x`` or ``θ``).

The chain of thought is the body of the ``<think>`` block (an unclosed block runs to the end of
the completion; a completion without think tags is all chain of thought). With fewer than
``MIN_WORDS`` scorable words the reward is the neutral value ``NEUTRAL`` = 1.0: a short or all-math
chain of thought shows no language mixing, and a neutral value below 1 would pay the model for
writing more words rather than for staying in one language. An unknown language code gives None.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from rewards.extract import math_spans
from rewards.registry import Score, column, register, text_item

MIN_WORDS = 5
NEUTRAL = 1.0

_LATIN = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_KANA = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_LATIN_WORD = re.compile(rf"[{_LATIN}]{{2,}}")
_ASCII_WORD = re.compile(r"[A-Za-z]{2,}")
_HAN_CHAR = re.compile(rf"[{_HAN}]")
_KANA_CHAR = re.compile(rf"[{_KANA}]")
# letters of every other script, as runs (a negated class: not a non-letter, not Latin/Han/kana)
_OTHER_RUN = re.compile(rf"[^\W\d_\x00-\x7f{_LATIN}{_HAN}{_KANA}]+")
_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
# (first code point, script) for runs of other scripts; single letters of variable alphabets skip
_RUN_SCRIPTS = [(0x0370, "greek"), (0x0400, "cyrillic"), (0x0530, "other"), (0x0590, "hebrew"),
                (0x0600, "arabic"), (0x0780, "other"), (0x0900, "devanagari"), (0x0980, "other"),
                (0x0e00, "thai"), (0x0e80, "other"), (0x1100, "hangul"), (0x1200, "other"),
                (0x3130, "hangul"), (0x3190, "other"), (0xac00, "hangul"), (0xd7b0, "other")]
_VARIABLE_ALPHABETS = frozenset({"greek", "cyrillic"})

_LATIN_LANGS = ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "nb", "fi", "pl",
                "cs", "sk", "ro", "hu", "tr", "vi", "id", "ms", "ca", "hr", "sl", "et", "lv",
                "lt", "sw", "tl", "af", "ga", "is")
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {code: frozenset({"latin"}) for code in _LATIN_LANGS}
LANGUAGE_SCRIPTS.update({
    "zh": frozenset({"han"}), "ja": frozenset({"han", "kana"}), "ko": frozenset({"hangul"}),
    "ru": frozenset({"cyrillic"}), "uk": frozenset({"cyrillic"}), "bg": frozenset({"cyrillic"}),
    "sr": frozenset({"cyrillic"}), "el": frozenset({"greek"}), "ar": frozenset({"arabic"}),
    "fa": frozenset({"arabic"}), "ur": frozenset({"arabic"}), "he": frozenset({"hebrew"}),
    "hi": frozenset({"devanagari"}), "mr": frozenset({"devanagari"}),
    "ne": frozenset({"devanagari"}), "th": frozenset({"thai"}),
})


def chain_of_thought(completion: str) -> str:
    """The ``<think>`` body: up to ``</think>`` (or the end), from ``<think>`` (or the start)."""
    close = completion.find("</think>")
    open_ = completion.find("<think>")
    start = open_ + len("<think>") if open_ != -1 and (close == -1 or open_ < close) else 0
    return completion[start:close] if close >= start else completion[start:]


def _strip_math(text: str) -> str:
    if "$" in text or "\\" in text:
        spans = math_spans(text)
        if spans:
            pieces, pos = [], 0
            for a, _, _, d in spans:
                pieces.append(text[pos:a])
                pos = d
            pieces.append(text[pos:])
            text = " ".join(pieces)
        text = _LATEX_CMD.sub(" ", text)
    return text


def _run_script(run: str) -> str:
    cp = ord(run[0])
    script = "other"
    for first, name in _RUN_SCRIPTS:
        if cp < first:
            break
        script = name
    return script


def script_word_counts(text: str) -> Counter:
    """Scorable words per script in ``text`` (math, LaTeX, numbers, single letters skipped)."""
    text = _strip_math(text)
    counts = Counter({"latin": len(_LATIN_WORD.findall(text))})
    if text.isascii():
        return counts
    counts["han"] = len(_HAN_CHAR.findall(text))
    counts["kana"] = len(_KANA_CHAR.findall(text))
    for run in _OTHER_RUN.findall(text):
        script = _run_script(run)
        if len(run) > 1 or script not in _VARIABLE_ALPHABETS:
            counts[script] += 1
    return +counts


def _ascii_words_at_least(text: str, k: int) -> bool:
    """Whether an ASCII text has k scorable words, stopping at the k-th (the common case)."""
    found = 0
    for _ in _ASCII_WORD.finditer(_strip_math(text)):
        found += 1
        if found >= k:
            return True
    return found >= k


def _scripts_for(language: Any) -> frozenset[str] | None:
    if not isinstance(language, str):
        return None
    code = language.strip().lower().replace("_", "-").split("-")[0]
    return LANGUAGE_SCRIPTS.get(code)


@text_item
def language_consistency_item(completion: str, language: Any = "en", min_words: int = MIN_WORDS,
                              neutral: float = NEUTRAL, **_: Any) -> tuple[Score, str]:
    """Share of target-language words in the chain of thought; returns (score, reason)."""
    scripts = _scripts_for(language)
    if scripts is None:
        return None, f"unknown language {language!r}"
    cot = chain_of_thought(completion)
    if cot.isascii():  # only Latin script possible: the share is 1 or 0, given enough words
        if not _ascii_words_at_least(cot, min_words):
            return neutral, f"fewer than {min_words} scorable words"
        share = 1.0 if "latin" in scripts else 0.0
        return share, f"all words in Latin script ({language})"
    counts = script_word_counts(cot)
    total = sum(counts.values())
    if total < min_words:
        return neutral, f"only {total} scorable words"
    target = sum(counts[s] for s in scripts)
    return target / total, f"{target}/{total} words in {language}"


def language_consistency_reward(completions: list[str], **columns: Any) -> list[Score]:
    """Per completion, the proportion of ``language[i]`` words (default "en") in its CoT."""
    n = len(completions)
    langs = column(columns, "language", n, "en")
    min_words = columns.get("min_words", MIN_WORDS)
    neutral = columns.get("neutral", NEUTRAL)
    return [language_consistency_item(c, lang, min_words, neutral)[0]
            for c, lang in zip(completions, langs)]


language_consistency_reward = register("language_consistency", language_consistency_item)(language_consistency_reward)
