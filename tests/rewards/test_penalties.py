"""Optional penalties (rewards.penalties): DAPO overlong punishment and n-gram repetition."""
from __future__ import annotations

import pytest

from rewards import overlong_penalty, repetition_penalty
from rewards.penalties import overlong_value, repetition_item


@pytest.mark.parametrize(("length", "expected"), [
    (0, 0.0), (3000, 0.0), (3072, 0.0),          # up to L_max - L_cache = 4096 - 1024
    (3328, -0.25),                               # (3072 - 3328) / 1024
    (4096, -1.0), (4097, -1.0), (10 ** 6, -1.0),
])
def test_dapo_overlong(length, expected):
    assert overlong_value(length, 4096, 1024) == pytest.approx(expected)


def test_overlong_uses_token_lengths_when_given():
    assert overlong_penalty(["x" * 10, "y"], max_length=8, cache_length=4) == [-1.0, 0.0]
    assert overlong_penalty(["x", "y"], max_length=8, cache_length=4, completion_lengths=[6, 2]) == [-0.5, 0.0]


def test_overlong_rejects_bad_config():
    with pytest.raises(ValueError):
        overlong_value(5, max_length=4, cache_length=8)


@pytest.mark.parametrize(("text", "expected"), [
    ("one two three four five", 0.0),
    ("a b c a b c a b c", -(1 - 3 / 7)),            # 7 trigrams, 3 distinct
    ("same same same same same", -(1 - 1 / 3)),
    ("too short", 0.0),
    ("", 0.0),
    ("我我我我我", -(1 - 1 / 3)),                      # Han characters count as words
])
def test_repetition(text, expected):
    assert repetition_item(text)[0] == pytest.approx(expected)


def test_repetition_batch_and_scale():
    assert repetition_penalty(["a b c a b c a b c"], max_penalty=-0.5) == [pytest.approx(-0.5 * 4 / 7)]
    with pytest.raises(ValueError):
        repetition_item("a b c", max_penalty=1.0)
