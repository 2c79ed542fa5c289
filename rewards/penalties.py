"""Optional shaping penalties, off unless a config gives them a weight.

- ``overlong_penalty``: DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", Eq. 13)::

      R(y) = 0                          if |y| <= L_max - L_cache
           = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
           = -1                         if |y| > L_max

  |y| is the completion's length in tokens when the caller passes ``completion_ids`` (TRL, the GRPO
  stages) or ``completion_lengths`` (what DAPO
  uses); without them, in characters, and ``max_length`` / ``cache_length`` must
  then be given in characters too.
- ``repetition_penalty``: open-r1's n-gram repetition penalty (``get_repetition_penalty_reward``):
  ``max_penalty * (1 - distinct n-grams / n-grams)`` over whitespace words (Han and kana
  characters count as words), 0 for completions shorter than one n-gram.
"""
from __future__ import annotations

import re
from typing import Any

from rewards.registry import Score, column, register, text_item

DEFAULT_MAX_LENGTH = 4096
DEFAULT_CACHE_LENGTH = 1024

_CJK_CHAR = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def overlong_value(length: int, max_length: int = DEFAULT_MAX_LENGTH,
                   cache_length: int = DEFAULT_CACHE_LENGTH) -> float:
    """DAPO Eq. 13 for one length."""
    if not 0 < cache_length <= max_length:
        raise ValueError("need 0 < cache_length <= max_length")
    soft_start = max_length - cache_length
    if length <= soft_start:
        return 0.0
    if length <= max_length:
        return (soft_start - length) / cache_length
    return -1.0


@text_item
def overlong_item(completion: str, completion_length: int | None = None,
                  max_length: int = DEFAULT_MAX_LENGTH, cache_length: int = DEFAULT_CACHE_LENGTH,
                  **_: Any) -> tuple[Score, str]:
    length = len(completion) if completion_length is None else int(completion_length)
    value = overlong_value(length, max_length, cache_length)
    return value, f"length {length} of max {max_length} (soft zone {cache_length})"


def overlong_penalty(completions: list[str], max_length: int = DEFAULT_MAX_LENGTH,
                     cache_length: int = DEFAULT_CACHE_LENGTH, **columns: Any) -> list[Score]:
    """DAPO soft overlong punishment in [-1, 0] per completion."""
    lengths = column(columns, "completion_lengths", len(completions), None)
    return [overlong_item(c, n, max_length, cache_length)[0] for c, n in zip(completions, lengths)]


def _words(text: str) -> list[str]:
    return _CJK_CHAR.sub(r" \1 ", text).split() if not text.isascii() else text.split()


@text_item
def repetition_item(completion: str, ngram_size: int = 3, max_penalty: float = -1.0,
                    **_: Any) -> tuple[Score, str]:
    if max_penalty > 0:
        raise ValueError("max_penalty must be <= 0")
    words = _words(completion)
    if len(words) < ngram_size:
        return 0.0, "shorter than one n-gram"
    grams = list(zip(*(words[i:] for i in range(ngram_size))))
    distinct = len(set(grams))
    reason = f"{distinct}/{len(grams)} distinct {ngram_size}-grams"
    return max_penalty * (1 - distinct / len(grams)), reason


def repetition_penalty(completions: list[str], ngram_size: int = 3, max_penalty: float = -1.0,
                       **_: Any) -> list[Score]:
    """n-gram repetition penalty in [max_penalty, 0] per completion."""
    return [repetition_item(c, ngram_size, max_penalty)[0] for c in completions]


overlong_penalty = register("overlong_penalty", overlong_item)(overlong_penalty)
repetition_penalty = register("repetition_penalty", repetition_item)(repetition_penalty)
