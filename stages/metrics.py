"""Evaluation metrics over k sampled completions per problem: pass@k, maj@k, pass@1.

Where from:
- pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
  on Code", eq. 1): with n samples of which c are correct,
  pass@k = 1 - C(n-c, k) / C(n, k), averaged over problems. The binomials overflow for large n,
  so it is computed as their numpy code does, as a running product:
  C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
- pass@1 as DeepSeek-R1 reports it (DeepSeek-AI 2025, sec. 3.1): k samples per problem at a
  non-zero temperature (0.6, top-p 0.95), pass@1 = (1/k) sum_i p_i, the mean correctness. It equals
  the estimator above with k = 1.
- maj@k (self-consistency, Wang et al. 2023; R1's "cons@64"): the majority answer among k
  samples decides the problem. R1 does not say how ties break; here they break towards the answer
  that appears FIRST in sample order (deterministic, and independent of how answers sort as
  strings). Samples with no extractable answer do not vote; if none votes, the problem counts as
  wrong.
- Weighted majority vote and best-of-k (Wu et al. 2024, "Inference Scaling Laws", §3: voting
  weighted by a score, and best-of-n by a score). The score here is the model's own confidence, the
  length-normalised log-probability of the sample, mean_t log π(o_t); a vote weighs
  exp(mean_t log π(o_t)), the per-token geometric-mean probability (in (0, 1], so every vote
  counts positively). An outcome reward model's score slots into the same functions: its
  probability of "correct" is both the vote weight and the best-of-k score (`stages.orm`).
- `scaling_curve`: each method at k = 1, 2, 4, ... K, averaged over the ⌊K/k⌋ disjoint blocks of k
  samples of each problem (pass@k uses Chen et al.'s estimator over all K samples instead).

Training curves: every training stage writes `metrics.parquet` in one long format,
`METRICS_SCHEMA` (step, name, value), so `r1flow report` reads them all the same way.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import pyarrow as pa

METRICS_FIELDS: list[pa.Field] = [
    pa.field("step", pa.int64(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("value", pa.float64()),
]
METRICS_SCHEMA = pa.schema(METRICS_FIELDS)
"""metrics.parquet of base, sft, rl_zero and rl_reasoning (distill adds a leading `student`)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1).

    Args:
        n: samples drawn for the problem.
        c: how many of them are correct, 0 <= c <= n.
        k: the k of pass@k, 1 <= k <= n.

    Returns:
        The probability that at least one of k samples drawn without replacement from the n is
        correct, in [0, 1].
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): no factorials, no overflow.
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n samples, c correct)."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def pass_at_1(correct: Sequence[bool]) -> float:
    """R1's pass@1 for one problem: the mean correctness of its k samples."""
    if not correct:
        raise ValueError("pass_at_1 needs at least one sample")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-None answer; a tie goes to the answer that appears first.

    Args:
        answers: one (normalised) answer per sample, in sample order; None = no answer.

    Returns:
        The winning answer, or None if no sample has one.
    """
    counts: dict[Hashable, int] = {}
    for a in answers:  # dicts keep insertion order: the first occurrence fixes the tie order
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a, c in counts.items() if c == best)


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int) -> bool:
    """Whether the majority answer of the first k samples is correct.

    Args:
        answers: normalised answer per sample (None = none extracted), in sample order.
        correct: whether each sample is correct, aligned with `answers`.
        k: how many of the samples vote (the first k).

    Returns:
        The correctness of the first sample that gave the winning answer (samples with equal
        normalised answers are graded alike); False when no sample gave an answer.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    winner = majority_vote(answers[:k])
    if winner is None:
        return False
    return bool(next(ok for a, ok in zip(answers[:k], correct[:k]) if a == winner))


def weighted_majority_vote(answers: Sequence[Hashable | None], weights: Sequence[float]) -> Hashable | None:
    """The non-None answer with the largest summed weight; a tie goes to the answer seen first."""
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    totals: dict[Hashable, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + float(w)
    if not totals:
        return None
    best = max(totals.values())
    return next(a for a, t in totals.items() if t == best)


def _graded(answers: Sequence[Hashable | None], correct: Sequence[bool], winner: Hashable | None) -> bool:
    if winner is None:
        return False
    return bool(next(ok for a, ok in zip(answers, correct) if a == winner))


def weighted_maj_at_k(answers: Sequence[Hashable | None], weights: Sequence[float], correct: Sequence[bool],
                      k: int) -> bool:
    """Whether the weighted-majority answer of the first k samples is correct (as `maj_at_k`)."""
    if not len(answers) == len(weights) == len(correct):
        raise ValueError("answers, weights and correct must align")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    return _graded(answers[:k], correct[:k], weighted_majority_vote(answers[:k], weights[:k]))


def best_of_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> bool:
    """Whether the highest-scoring of the first k samples is correct (ties: the first of them)."""
    if len(scores) != len(correct):
        raise ValueError(f"{len(scores)} scores but {len(correct)} correctness flags")
    if not 1 <= k <= len(scores):
        raise ValueError(f"need 1 <= k <= {len(scores)}, got k={k}")
    best = max(range(k), key=lambda i: (scores[i], -i))
    return bool(correct[best])


def scaling_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def scaling_curve(problems: Sequence[tuple[Sequence[Hashable | None], Sequence[float], Sequence[bool]]],
                  weight: Callable[[float], float] = math.exp) -> list[dict[str, float]]:
    """Inference-time scaling of one checkpoint: per k, maj@k, weighted maj@k, best-of-k, pass@k.

    Args:
        problems: per problem (answers, scores, correct), its K samples in sample order (every
            problem the same K). Best-of-k picks the highest score.
        weight: a sample's vote weight from its score: exp for the length-normalised log-probability
            (the default), the identity for an ORM's probability.
    Returns:
        one row per k in `scaling_ks(K)`: {"k", "maj", "weighted_maj", "best_of", "pass"}, each the
        mean over problems of the mean over the problem's disjoint blocks of k samples.
    """
    if not problems:
        raise ValueError("scaling_curve needs at least one problem")
    n = len(problems[0][0])
    if any(len(a) != n for a, _, _ in problems):
        raise ValueError("every problem needs the same number of samples")
    rows = []
    for k in scaling_ks(n):
        per: dict[str, list[float]] = {"maj": [], "weighted_maj": [], "best_of": []}
        for answers, scores, correct in problems:
            weights = [float(weight(s)) for s in scores]
            blocks = [slice(b * k, (b + 1) * k) for b in range(n // k)]
            per["maj"].append(np.mean([maj_at_k(answers[sl], correct[sl], k) for sl in blocks]))
            per["weighted_maj"].append(np.mean([weighted_maj_at_k(answers[sl], weights[sl], correct[sl], k)
                                                for sl in blocks]))
            per["best_of"].append(np.mean([best_of_k(scores[sl], correct[sl], k) for sl in blocks]))
        rows.append({"k": k, **{m: float(np.mean(v)) for m, v in per.items()},
                     "pass": mean_pass_at_k([(n, int(sum(c))) for _, _, c in problems], k)})
    return rows
