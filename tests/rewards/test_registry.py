"""Registry, per-item explanations and weighted combination (rewards.registry)."""
from __future__ import annotations

import logging

import pytest

import rewards
from rewards import REGISTRY, combine, explain
from rewards.registry import column

GOOD = "<think>we add the two numbers and check</think><answer>4</answer>"
WRONG = "<think>we add the two numbers and check</think><answer>5</answer>"


def test_public_imports_and_names():
    from rewards import accuracy_reward, format_reward, language_consistency_reward  # noqa: F401

    assert {"accuracy", "format", "format_soft", "language_consistency", "overlong_penalty",
            "repetition_penalty"} <= set(REGISTRY)
    assert REGISTRY["accuracy"] is rewards.accuracy_reward


def test_every_reward_follows_the_convention():
    completions = [GOOD, WRONG]
    for name, fn in REGISTRY.items():
        scores = fn(completions, answer=["4", "4"], language=["en", "en"], unrelated=[1, 2])
        assert len(scores) == 2, name
        assert all(s is None or isinstance(s, float) for s in scores), name


def test_explain_gives_a_reason():
    assert explain("accuracy", WRONG, answer="4") == (0.0, "different numbers")
    assert explain("format", "<think>a</think>")[1] == "missing <answer>"
    with pytest.raises(KeyError, match="unknown reward"):
        explain("nope", GOOD)


def test_combine_weighted_sum():
    out = combine({"accuracy": 1.0, "format": 0.5}, [GOOD, WRONG, "4"], answer=["4", "4", "4"])
    assert out.components["accuracy"] == [1.0, 0.0, 1.0]
    assert out.components["format"] == [1.0, 1.0, 0.0]
    assert out.total == [1.5, 0.5, 1.0]
    total, components = out
    assert total == out.total and components is out.components


def test_combine_reports_and_excludes_none(caplog):
    with caplog.at_level(logging.WARNING, logger="r1flow.rewards"):
        out = combine({"accuracy": 1.0, "format": 0.5}, [GOOD, GOOD], answer=[None, "4"])
    assert out.components["accuracy"] == [None, 1.0]
    assert out.total == [0.5, 1.5]
    assert out.none_counts() == {"accuracy": 1, "format": 0}
    assert "accuracy" in caplog.text


def test_combine_all_none_gives_none():
    out = combine({"language_consistency": 1.0}, [GOOD], language=["xx"])
    assert out.total == [None]


def test_combine_passes_options_and_checks_names():
    out = combine({"overlong_penalty": 1.0}, ["x" * 10], options={"overlong_penalty": {"max_length": 8, "cache_length": 4}})
    assert out.total == [-1.0]
    with pytest.raises(KeyError, match="unknown reward"):
        combine({"nope": 1.0}, [GOOD])
    with pytest.raises(KeyError, match="without a weight"):
        combine({"format": 1.0}, [GOOD], options={"accuracy": {}})


def test_accuracy_requires_answer_column():
    with pytest.raises(ValueError, match="answer"):
        rewards.accuracy_reward([GOOD])


def test_column_helper():
    assert column({"a": [1, 2]}, "a", 2, 0) == [1, 2]
    assert column({"a": "en"}, "a", 3, None) == ["en"] * 3
    assert column({}, "a", 2, "en") == ["en", "en"]
    assert column({"a": [None, "zh"]}, "a", 2, "en") == ["en", "zh"]
    with pytest.raises(ValueError, match="'a' has 1 values for 2"):
        column({"a": [1]}, "a", 2, 0)
