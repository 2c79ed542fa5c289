"""R1's readability filters as small pure functions, and the filter chain cold_start and
rejection_sampling share.

Where from: DeepSeek-R1 (DeepSeek-AI 2025), sec. 2.3.1 (cold start: "filter out responses that
are not reader-friendly", a readable pattern with a summary) and sec. 2.3.3 (rejection sampling:
keep only correct responses and "filter out chain-of-thought with mixed languages, long paragraphs,
and code blocks"). The paper names the criteria, not their thresholds; the thresholds here are
config fields of the two stages, with defaults sized for the synthetic arithmetic traces.

The checks, in the order a sample's drop reason is assigned (the first failing one):

- ``correct``: the accuracy reward is 1 (rewards.accuracy_reward; None = no answer = wrong).
- ``format``: the format reward is 1 (rewards.format_reward: <think>…</think> <answer>…</answer>).
- ``length``: the completion ended by itself (not cut at max_new_tokens) with a token count in
  [min_tokens, max_tokens].
- ``language``: rewards.language_consistency_reward >= a threshold, judged on think bodies with at
  least `language_min_words` words (default 1: one foreign-script word makes a trace mixed; the RL
  reward's own default of 5 exists so as not to pay for verbosity, which does not apply to a
  filter). A think body with nothing to judge (pure arithmetic) cannot be mixed, so it passes.
- ``repetition``: no degenerate loop (a block of words, or of characters for scripts written
  without spaces, repeated back to back).
- ``paragraph``: no paragraph (text between blank lines) longer than max_paragraph_chars.
- ``code_fence``: no Markdown code fence (```).
- ``duplicate``: not a near-duplicate (shingle Jaccard >= threshold) of an earlier surviving
  sample of the same prompt; runs after every other check, so a bad sample never shadows a good one.

Then at most ``keep_per_prompt`` survivors per prompt are kept (in sample order); the rest are
dropped as ``over_cap``. Every candidate is either kept or has exactly one drop reason, so the
per-reason counts add up to the number of candidates.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import regex
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lm.chat_template import prefills_think
from rewards import accuracy_reward, format_reward, language_consistency_reward

CHECKS: tuple[str, ...] = ("correct", "format", "length", "language", "repetition", "paragraph",
                           "code_fence", "duplicate")
OVER_CAP = "over_cap"
DROP_REASONS: tuple[str, ...] = CHECKS + (OVER_CAP,)

# A "word": one CJK character, a run of other letters, a run of digits, or one other symbol.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_WORD_RE = regex.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[\p{{L}}\p{{M}}])+|\p{{N}}+|[^\s\p{{L}}\p{{M}}\p{{N}}]")
_PARAGRAPH_RE = regex.compile(r"\n[ \t]*\n")
_SPACE_RE = regex.compile(r"\s+")


# --------------------------------------------------------------------------------- single checks


def words(text: str) -> list[str]:
    """The text's words: CJK characters, letter runs, digit runs and single symbols."""
    return _WORD_RE.findall(text)


def has_code_fence(text: str) -> bool:
    """Whether the text holds a Markdown code fence (R1 drops "code blocks" from reasoning data)."""
    return "```" in text or "~~~" in text


def longest_paragraph(text: str) -> int:
    """Characters in the longest paragraph, paragraphs being separated by blank lines."""
    return max((len(p.strip()) for p in _PARAGRAPH_RE.split(text)), default=0)


def has_overlong_paragraph(text: str, max_chars: int) -> bool:
    """Whether some paragraph is longer than `max_chars` (R1's "long paragraphs")."""
    return longest_paragraph(text) > max_chars


# Texts longer than this (items) are scanned one period at a time: the [P, L] matrix would be large.
REPEAT_MATRIX_MAX_ITEMS = 8192


def longest_repeat_run(codes: np.ndarray, max_period: int) -> tuple[int, int]:
    """The longest back-to-back repetition of a block of 1..max_period items.

    A block of period p repeated r times means codes[i] == codes[i+p] for (r-1)*p consecutive i.
    Vectorised over every period at once for the texts a sampler writes (one [P, L] comparison
    matrix: the chain judges thousands of samples per stage, and per-period numpy calls cost ~1 ms a
    text); one period at a time for very long texts, which would make that matrix large.

    Args:
        codes: [L] integer codes of the items (words or characters).
        max_period: the longest block length considered.

    Returns:
        (repeats, period) of the run that covers the most items (repeats * period; the shortest
        period on a tie), (1, 0) if none.
    """
    L = len(codes)
    n_periods = min(max_period, L - 1)
    if n_periods < 1:
        return 1, 0
    periods = np.arange(1, n_periods + 1)  # [P]
    if L > REPEAT_MATRIX_MAX_ITEMS:
        streaks = np.array([_longest_true_run(codes[:-p] == codes[p:]) for p in periods])  # [P]
    else:
        ahead = np.arange(L - 1)[None, :] + periods[:, None]  # [P, L-1] index of the item p ahead
        eq = (codes[None, :L - 1] == codes[np.minimum(ahead, L - 1)]) & (ahead < L)  # [P, L-1]
        run = np.cumsum(eq, axis=1, dtype=np.int32)  # [P, L-1]
        run -= np.maximum.accumulate(np.where(eq, 0, run), axis=1)  # [P, L-1] length of the run ending here
        streaks = run.max(axis=1)  # [P]
    repeats = streaks // periods + 1  # [P]
    cover = np.where(repeats >= 2, repeats * periods, 0)  # [P]
    best = int(np.argmax(cover))  # the first (shortest) period of the largest cover
    return (int(repeats[best]), int(periods[best])) if cover[best] > 0 else (1, 0)


def _longest_true_run(flags: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D bool array (0 if none)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags.view(np.int8), [0]))))  # run starts/ends
    return int((edges[1::2] - edges[::2]).max()) if edges.size else 0


def _codes(items: Sequence[str]) -> np.ndarray:
    """Integer codes of items, equal items sharing a code."""
    table: dict[str, int] = {}
    return np.fromiter((table.setdefault(x, len(table)) for x in items), dtype=np.int64, count=len(items))


def has_repetition_loop(text: str, *, max_period: int = 16, min_repeats: int = 3,
                        min_span_words: int = 15, min_span_chars: int = 60) -> bool:
    """Whether the text degenerates into a loop, the failure mode of small sampled models.

    A loop is a block of words (period 1..max_period; numbers, words, symbols and CJK characters
    each count as one) repeated at least `min_repeats` times back to back and spanning at least
    `min_span_words` words, e.g. "7+5=12 7+5=12 7+5=12"; or the same on characters (blocks of up
    to 2 * max_period characters spanning `min_span_chars`), which catches "1111…" and long loops
    of a step. Legitimate steps differ in their numbers, so they never repeat verbatim three
    times in a row.
    """
    repeats, period = longest_repeat_run(_codes(words(text)), max_period)
    if repeats >= min_repeats and repeats * period >= min_span_words:
        return True
    chars = _SPACE_RE.sub(" ", text)
    codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)  # [L] one code per character
    repeats, period = longest_repeat_run(codes, 2 * max_period)
    return repeats >= min_repeats and repeats * period >= min_span_chars


def length_ok(n_tokens: int, finish_reason: str, min_tokens: int, max_tokens: int | None) -> bool:
    """The completion stopped by itself and its length lies in [min_tokens, max_tokens]."""
    if finish_reason != "stop":
        return False
    return n_tokens >= min_tokens and (max_tokens is None or n_tokens <= max_tokens)


def language_ok(consistency: float | None, threshold: float) -> bool:
    """Consistency at or above `threshold`; None (nothing to judge) passes."""
    return consistency is None or consistency >= threshold


def is_language_mixed(consistency: float | None) -> bool:
    """evaluate's language-mix flag: a judgeable think body not all in the target language."""
    return consistency is not None and consistency < 1.0


# ------------------------------------------------------------------------------ near-duplicates


def normalize_text(text: str) -> str:
    """Case-folded, whitespace-collapsed text: the form near-duplicates are compared in."""
    return _SPACE_RE.sub(" ", text.casefold()).strip()


def shingles(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    """Word n-grams of the normalised text (CJK characters count as words); a text shorter than n
    words is one shingle."""
    w = words(normalize_text(text))
    if len(w) < n:
        return frozenset([tuple(w)])
    return frozenset(tuple(w[i:i + n]) for i in range(len(w) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def duplicate_flags(texts: Sequence[str], threshold: float, n: int = 3) -> list[bool]:
    """Greedy near-duplicate removal in order: a text is a duplicate if its normalised form equals,
    or its shingle set has Jaccard >= `threshold` with, a text kept before it.

    Quadratic in len(texts): meant for the handful of samples of one prompt.
    """
    kept_norm: set[str] = set()
    kept_sh: list[frozenset] = []
    flags = []
    for t in texts:
        norm = normalize_text(t)
        sh = shingles(t, n)
        dup = norm in kept_norm or any(jaccard(sh, k) >= threshold for k in kept_sh)
        flags.append(dup)
        if not dup:
            kept_norm.add(norm)
            kept_sh.append(sh)
    return flags


# ---------------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class FilterParams:
    """Which checks a stage applies and their thresholds (built from the stage's Config).

    `checks` are names from CHECKS; checks not listed are recorded as None (not applied).
    """

    checks: tuple[str, ...]
    keep_per_prompt: int | None = None
    min_language_consistency: float = 1.0
    language_min_words: int = 1
    min_tokens: int = 1
    max_tokens: int | None = None
    max_paragraph_chars: int = 1200
    dedupe_threshold: float = 0.9
    loop_min_repeats: int = 3
    loop_min_span_words: int = 15
    think_prefilled: bool = False  # the prompts opened <think> (template "chat_think"): the format check adds it

    def __post_init__(self) -> None:
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown:
            raise ValueError(f"unknown filter checks {unknown}; the checks are: {', '.join(CHECKS)}")


@dataclass
class Candidate:
    """One completion to judge. `answer` None means no reference (correctness not checkable);
    `language` None means no target language (language check not applicable)."""

    group: str  # the prompt it answers (dedupe and the per-prompt cap work within a group)
    completion: str
    n_tokens: int
    finish_reason: str
    answer: str | None = None
    language: str | None = None


@dataclass
class Judgement:
    """What the chain found for one candidate. `passed[check]` is True/False, or None when the
    check was not applied (not configured, or its input is missing)."""

    accuracy: float | None
    format_score: float | None
    language_consistency: float | None
    passed: dict[str, bool | None] = field(default_factory=dict)
    drop_reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.drop_reason is None


def judge(candidates: Sequence[Candidate], params: FilterParams) -> list[Judgement]:
    """Run the filter chain over candidates (see the module docstring for the order).

    Rewards are computed in one batch per reward; the text checks are per candidate; dedupe and
    the cap run per group over the survivors, in candidate order.
    """
    texts = [c.completion for c in candidates]
    accuracy = _batched(accuracy_reward, candidates, "answer") if "correct" in params.checks else [None] * len(texts)
    fmt = format_reward(texts, think_prefilled=params.think_prefilled) if "format" in params.checks else [None] * len(texts)
    lang = (_batched(language_consistency_reward, candidates, "language", min_words=params.language_min_words)
            if "language" in params.checks else [None] * len(texts))
    judgements = []
    for c, acc, f, lc in zip(candidates, accuracy, fmt, lang):
        passed = _text_checks(c, acc, f, lc, params)
        reason = next((name for name in CHECKS if passed.get(name) is False), None)
        judgements.append(Judgement(acc, f, lc, passed, reason))
    _dedupe_and_cap(candidates, judgements, params)
    return judgements


def _batched(fn, candidates: Sequence[Candidate], column: str, **options: Any) -> list[float | None]:
    """Call a reward on the candidates whose `column` is set; None for the others."""
    idx = [i for i, c in enumerate(candidates) if getattr(c, column) is not None]
    out: list[float | None] = [None] * len(candidates)
    if idx:
        scores = fn([candidates[i].completion for i in idx], **{column: [getattr(candidates[i], column) for i in idx]},
                    **options)
        for i, s in zip(idx, scores):
            out[i] = s
    return out


def _text_checks(c: Candidate, accuracy: float | None, fmt: float | None, consistency: float | None,
                 params: FilterParams) -> dict[str, bool | None]:
    on = set(params.checks)
    text = c.completion
    passed: dict[str, bool | None] = {name: None for name in CHECKS}
    if "correct" in on and c.answer is not None:
        passed["correct"] = accuracy is not None and accuracy >= 1.0
    if "format" in on:
        passed["format"] = fmt is not None and fmt >= 1.0
    if "length" in on:
        passed["length"] = length_ok(c.n_tokens, c.finish_reason, params.min_tokens, params.max_tokens)
    if "language" in on and c.language is not None:
        passed["language"] = language_ok(consistency, params.min_language_consistency)
    if "repetition" in on:
        passed["repetition"] = not has_repetition_loop(text, min_repeats=params.loop_min_repeats,
                                                       min_span_words=params.loop_min_span_words)
    if "paragraph" in on:
        passed["paragraph"] = not has_overlong_paragraph(text, params.max_paragraph_chars)
    if "code_fence" in on:
        passed["code_fence"] = not has_code_fence(text)
    return passed


def _dedupe_and_cap(candidates: Sequence[Candidate], judgements: list[Judgement], params: FilterParams) -> None:
    """Per group, over candidates that passed every other check: flag near-duplicates, then keep
    the first `keep_per_prompt`. Mutates `judgements`."""
    groups: dict[str, list[int]] = {}
    for i, (c, j) in enumerate(zip(candidates, judgements)):
        if j.kept:
            groups.setdefault(c.group, []).append(i)
    for idx in groups.values():
        if "duplicate" in params.checks:
            flags = duplicate_flags([candidates[i].completion for i in idx], params.dedupe_threshold)
            for i, dup in zip(idx, flags):
                judgements[i].passed["duplicate"] = not dup
                if dup:
                    judgements[i].drop_reason = "duplicate"
        survivors = [i for i in idx if judgements[i].kept]
        if params.keep_per_prompt is not None:
            for i in survivors[params.keep_per_prompt:]:
                judgements[i].drop_reason = OVER_CAP


def drop_counts(judgements: Sequence[Judgement]) -> dict[str, int]:
    """Candidates dropped per reason, every reason present (zeros included)."""
    counts = {r: 0 for r in DROP_REASONS}
    for j in judgements:
        if j.drop_reason is not None:
            counts[j.drop_reason] += 1
    return counts


# Columns of a candidate row (cold_start and rejection_sampling write them): what was sampled, the
# three reward scores, and one pass_<check> column per check (null = not applied).
CANDIDATE_FIELDS: list[pa.Field] = [
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("answer", pa.string()),
    pa.field("language", pa.string()),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("origin", pa.string(), nullable=False),  # the checkpoint sampled from, or "file"
    pa.field("accuracy", pa.float64()),
    pa.field("format_score", pa.float64()),
    pa.field("language_consistency", pa.float64()),
    *[pa.field(f"pass_{c}", pa.bool_()) for c in CHECKS],
]
CANDIDATES_SCHEMA = pa.schema([*CANDIDATE_FIELDS, pa.field("drop_reason", pa.string())])


def filter_record(j: Judgement) -> dict[str, Any]:
    """One candidate's filter columns for Parquet: `pass_<check>` (bool, or null = not applied),
    the three reward scores, and `drop_reason` (null when kept)."""
    rec: dict[str, Any] = {f"pass_{name}": j.passed.get(name) for name in CHECKS}
    rec.update(accuracy=j.accuracy, format_score=j.format_score, language_consistency=j.language_consistency,
               drop_reason=j.drop_reason)
    return rec


# ------------------------------------------------------------------- what the two stages share


class FilterSettings(BaseModel):
    """The filter chain's knobs: the part of the cold_start and rejection_sampling configs that is
    the same in both (each stage's Config inherits it; cold_start narrows the default checks)."""

    model_config = ConfigDict(extra="forbid")

    checks: list[str] = Field(default_factory=lambda: list(CHECKS))
    keep_per_prompt: int = Field(2, ge=1, description="m: at most this many kept per prompt")
    min_language_consistency: float = Field(1.0, ge=0, le=1)
    language_min_words: int = Field(1, ge=1, description="words a think body needs to be judged")
    min_tokens: int = Field(8, ge=0)
    max_tokens: int | None = Field(None, ge=1, description="upper length bound (None: only cut-off rows fail)")
    max_paragraph_chars: int = Field(1200, ge=1)
    dedupe_threshold: float = Field(0.9, gt=0, le=1)

    @field_validator("checks")
    @classmethod
    def _known_checks(cls, v: list[str]) -> list[str]:
        unknown = [c for c in v if c not in CHECKS]
        if unknown:
            raise ValueError(f"unknown checks {unknown}; the checks are: {', '.join(CHECKS)}")
        return v

    def filter_params(self) -> FilterParams:
        return FilterParams(
            checks=tuple(self.checks), keep_per_prompt=self.keep_per_prompt,
            min_language_consistency=self.min_language_consistency, language_min_words=self.language_min_words,
            min_tokens=self.min_tokens, max_tokens=self.max_tokens, max_paragraph_chars=self.max_paragraph_chars,
            dedupe_threshold=self.dedupe_threshold, think_prefilled=prefills_think(getattr(self, "template", None)))


def judge_rows(rows: list[dict[str, Any]], params: FilterParams, stage: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Run the chain over sampled rows (`problem_id`, `completion`, `n_tokens`, `finish_reason`,
    `answer`, `language`): each row gains its filter columns in place. Correctness is measured
    even when it is not a check (pass rates and preference pairs need it; it then drops nothing).

    Returns the kept rows and the drop counts per reason; raises if a row has no single fate.
    """
    candidates = [Candidate(group=r["problem_id"], completion=r["completion"], n_tokens=r["n_tokens"],
                            finish_reason=r["finish_reason"], answer=r["answer"], language=r["language"])
                  for r in rows]
    judgements = judge(candidates, params)
    if "correct" not in params.checks:
        for j, score in zip(judgements, _batched(accuracy_reward, candidates, "answer")):
            j.accuracy = score
    for r, j in zip(rows, judgements):
        r.update(filter_record(j))
    kept = [r for r in rows if r["drop_reason"] is None]
    counts = drop_counts(judgements)
    if len(kept) + sum(counts.values()) != len(rows):  # every candidate has one fate
        raise RuntimeError(f"{stage} bookkeeping: {len(kept)} kept + {sum(counts.values())} dropped "
                           f"!= {len(rows)} candidates")
    return kept, counts


def kept_summary(rows: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]], n_prompts: int,
                 counts: dict[str, int]) -> dict[str, Any]:
    """The summary fields both filtering stages report; the drop counts add up to the candidates."""
    return {
        "prompts": n_prompts,
        "candidates": len(rows),
        "kept": len(kept),
        "kept_rate": round(len(kept) / len(rows), 6) if rows else 0.0,
        "kept_prompts": len({r["problem_id"] for r in kept}),
        "mean_kept_tokens": round(sum(r["n_tokens"] for r in kept) / len(kept), 3) if kept else 0.0,
        **{f"dropped_{reason}": n for reason, n in counts.items()},
    }
