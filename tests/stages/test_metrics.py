"""pass@k, maj@k and pass@1 against values worked out by hand."""
from __future__ import annotations

import math

import pytest

from stages import metrics
from stages.metrics import maj_at_k, majority_vote, mean_pass_at_k, pass_at_1, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    # 1 - C(n-c, k) / C(n, k) with n = 5 samples, c = 2 correct:
    (5, 2, 1, 1 - 3 / 5),     # C(3,1)/C(5,1) = 3/5            -> 0.4
    (5, 2, 2, 1 - 3 / 10),    # C(3,2)/C(5,2) = 3/10           -> 0.7
    (5, 2, 3, 1 - 1 / 10),    # C(3,3)/C(5,3) = 1/10           -> 0.9
    (5, 2, 4, 1.0),           # n-c = 3 < k = 4: every 4-subset holds a correct one
    (4, 0, 2, 0.0),           # C(4,2)/C(4,2) = 1              -> 0
    (4, 4, 1, 1.0),
    (10, 3, 5, 1 - 21 / 252), # C(7,5) = 21, C(10,5) = 252     -> 0.916666...
])
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_exact_binomials_and_stays_finite_for_large_n() -> None:
    for n, c, k in [(200, 13, 10), (64, 1, 8), (100, 50, 50)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)
    # C(10000, 100) overflows a float; the product form does not: 1 - prod (1 - 100/i), i = 9996..10000
    v = pass_at_k(10_000, 5, 100)
    assert 0.0 < v < 1.0 and math.isfinite(v)
    assert v == pytest.approx(1 - math.comb(9_995, 100) / math.comb(10_000, 100), rel=1e-9)


def test_pass_at_1_is_the_fraction_correct() -> None:
    for n in range(1, 7):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    # R1's pass@1: mean correctness of k = 4 samples, 3 right -> 0.75
    assert pass_at_1([True, False, True, True]) == 0.75
    # over problems: (n=4, c=1) -> 1/4 and (n=4, c=3) -> 3/4; mean 0.5
    assert mean_pass_at_k([(4, 1), (4, 3)], 1) == pytest.approx(0.5)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote_tie_goes_to_the_first_answer_seen() -> None:
    # "3" and "5" both have 2 votes; "3" appears first -> "3"
    assert majority_vote(["3", "5", "5", "3"]) == "3"
    assert majority_vote(["5", "3", "3", "5"]) == "5"
    # a strict majority wins regardless of order
    assert majority_vote(["3", "5", "5"]) == "5"
    # samples with no answer do not vote
    assert majority_vote([None, None, "4"]) == "4"
    assert majority_vote([None, None]) is None


def test_maj_at_k_grades_the_winning_answer() -> None:
    # tie 2-2 between "3" (wrong) and "5" (right): "3" came first -> wrong
    assert maj_at_k(["3", "5", "5", "3"], [False, True, True, False], k=4) is False
    assert maj_at_k(["5", "3", "3", "5"], [True, False, False, True], k=4) is True
    # only the first k vote: k = 1 -> "1" (wrong) though "2" wins among all three
    assert maj_at_k(["1", "2", "2"], [False, True, True], k=1) is False
    assert maj_at_k(["1", "2", "2"], [False, True, True], k=3) is True
    # nobody answered -> wrong
    assert maj_at_k([None, None], [False, False], k=2) is False
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False], k=1)


# ------------------------------------------------------------------------- inference-time scaling


def test_weighted_majority_vote_hand_worked() -> None:
    # "3" has two votes of .2 (sum .4), "5" one vote of .9: the plain majority says 3, the weighted 5
    answers, weights = ["3", "5", "3", None], [0.2, 0.9, 0.2, 5.0]
    assert metrics.majority_vote(answers) == "3"
    assert metrics.weighted_majority_vote(answers, weights) == "5"
    # a tie (.5 + .5 vs 1.0) goes to the answer seen first
    assert metrics.weighted_majority_vote(["7", "8", "7"], [0.5, 1.0, 0.5]) == "7"
    assert metrics.weighted_majority_vote([None, None], [1.0, 1.0]) is None
    assert metrics.weighted_maj_at_k(answers, weights, [False, True, False, False], 3) is True
    assert metrics.weighted_maj_at_k(answers, weights, [False, True, False, False], 1) is False


def test_best_of_k_hand_worked() -> None:
    # scores -.5, -.1, -.1, -2: among the first 3 the best is -.1, first at index 1 (correct)
    scores, correct = [-0.5, -0.1, -0.1, -2.0], [False, True, False, False]
    assert metrics.best_of_k(scores, correct, 3) is True
    assert metrics.best_of_k(scores, correct, 1) is False


def test_scaling_curve_hand_worked() -> None:
    # one problem, K = 4 samples: answers 1 (wrong), 2 (right), 2 (right), 1 (wrong)
    # log-prob scores -1, -3, -3, -0.1 -> weights e^-1 = .368, e^-3 = .050, .050, e^-.1 = .905
    # k = 1: blocks {0},{1},{2},{3}: maj = weighted = best = right in 2 of 4 -> .5; pass@1 = 2/4
    # k = 2: blocks {0,1}: maj tie -> first seen "1" wrong; weighted .368 vs .050 -> "1" wrong;
    #           best score -1 (sample 0) wrong. {2,3}: maj tie -> "2" right; weighted .050 vs .905
    #           -> "1" wrong; best -.1 (sample 3) wrong  => maj .5, weighted 0, best_of 0
    #        pass@2 = 1 - C(2,2)/C(4,2) = 1 - 1/6
    # k = 4: maj 2-2 tie -> "1" (first) wrong; weighted "1": .368 + .905 vs "2": .1 -> wrong;
    #        best -.1 wrong; pass@4 = 1
    rows = metrics.scaling_curve([(["1", "2", "2", "1"], [-1.0, -3.0, -3.0, -0.1], [False, True, True, False])])
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert rows[0] == {"k": 1, "maj": 0.5, "weighted_maj": 0.5, "best_of": 0.5, "pass": 0.5}
    assert rows[1]["maj"] == 0.5 and rows[1]["weighted_maj"] == 0.0 and rows[1]["best_of"] == 0.0
    assert rows[1]["pass"] == pytest.approx(1 - 1 / 6)
    assert rows[2] == {"k": 4, "maj": 0.0, "weighted_maj": 0.0, "best_of": 0.0, "pass": 1.0}
    assert metrics.scaling_ks(6) == [1, 2, 4, 6] and metrics.scaling_ks(1) == [1]
