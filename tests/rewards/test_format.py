"""R1-Zero format reward (rewards.format), strict and soft."""
from __future__ import annotations

import pytest

from rewards import format_reward, format_soft_reward
from rewards.format import format_item, format_soft_item, prompt_opens_think

GOOD = "<think>\nreasoning\n</think>\n<answer>\n42\n</answer>"

STRICT = [
    ("well-formed", GOOD, 1.0),
    ("no-newlines", "<think>r</think><answer>4</answer>", 1.0),
    ("surrounding-whitespace", "  \n" + GOOD + "\n\n", 1.0),
    ("empty-think", "<think> \n </think><answer>4</answer>", 0.0),
    ("empty-answer", "<think>r</think><answer>  </answer>", 0.0),
    ("both-empty", "<think></think><answer></answer>", 0.0),
    ("two-think-blocks", "<think>a</think><think>b</think><answer>4</answer>", 0.0),
    ("two-answer-blocks", "<think>a</think><answer>4</answer><answer>5</answer>", 0.0),
    ("nested-answer-in-think", "<think>a<answer>4</answer></think><answer>4</answer>", 0.0),
    ("nested-think-in-answer", "<think>a</think><answer><think>b</think>4</answer>", 0.0),
    ("text-before", "Sure! <think>a</think><answer>4</answer>", 0.0),
    ("text-between", "<think>a</think> so <answer>4</answer>", 0.0),
    ("text-after", "<think>a</think><answer>4</answer> done", 0.0),
    ("answer-first", "<answer>4</answer><think>a</think>", 0.0),
    ("missing-answer", "<think>a</think>", 0.0),
    ("missing-think", "<answer>4</answer>", 0.0),
    ("unclosed-answer", "<think>a</think><answer>4", 0.0),
    ("plain-text", "The answer is 4.", 0.0),
    ("empty-string", "", 0.0),
    ("uppercase-tags-are-not-tags", "<THINK>a</THINK><ANSWER>4</ANSWER>", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), [c[1:] for c in STRICT], ids=[c[0] for c in STRICT])
def test_strict(completion, expected):
    score, reason = format_item(completion)
    assert score == expected, reason


SOFT = [
    ("well-formed", GOOD, 1.0),
    ("text-around", "Sure. <think>a</think> so <answer>4</answer> bye", 1.0),
    ("think-only", "<think>a</think> 4", 0.5),
    ("answer-only", "<answer>4</answer>", 0.5),
    ("empty-tags", "<think></think><answer></answer>", 0.0),
    ("two-think-blocks", "<think>a</think><think>b</think><answer>4</answer>", 0.5),
    ("two-answer-blocks", "<think>a</think><answer>4</answer><answer>5</answer>", 0.5),
    ("answer-inside-think", "<think>a<answer>4</answer></think>", 0.0),
    ("answer-before-think", "<answer>4</answer><think>a</think>", 0.5),
]


@pytest.mark.parametrize(("completion", "expected"), [c[1:] for c in SOFT], ids=[c[0] for c in SOFT])
def test_soft(completion, expected):
    score, reason = format_soft_item(completion)
    assert score == expected, reason


def test_prompt_that_opened_think():
    completion = "reasoning</think><answer>4</answer>"
    assert format_item(completion)[0] == 0.0
    assert format_item(completion, think_prefilled=True)[0] == 1.0
    assert format_item("<think>again" + completion, think_prefilled=True)[0] == 0.0
    prompts = ["User: 2+2? Assistant: <think>", "User: 2+2? Assistant:"]
    assert format_reward([completion, completion], prompts=prompts) == [1.0, 0.0]
    assert format_reward([completion], prompt=["... <think>\n"]) == [1.0]
    assert format_reward([completion], think_prefilled=True) == [1.0]


def test_chat_prompt_detection():
    assert prompt_opens_think([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>"}])
    assert not prompt_opens_think([{"role": "user", "content": "q"}])
    assert not prompt_opens_think(None)


def test_batch_forms():
    completions = [GOOD, "nope", "<think>a</think>"]
    assert format_reward(completions) == [1.0, 0.0, 0.0]
    assert format_soft_reward(completions) == [1.0, 0.0, 0.5]
    assert format_reward([]) == []


def test_misaligned_prompt_column_is_an_error():
    with pytest.raises(ValueError, match="prompts|'p'"):
        format_reward([GOOD, GOOD], prompts=["only one"])


def test_tag_count_pays_a_quarter_per_tag_written_once():
    from rewards import REGISTRY, format_tags_reward

    completions = [GOOD, "nope", "<think>a</think>", "a </think> b <answer>", "<answer>1</answer><answer>2</answer>"]
    assert format_tags_reward(completions) == [1.0, 0.0, 0.5, 0.5, 0.0]
    # under a prefilled "<think>" the prompt's tag counts, and a second one in the completion breaks it
    assert format_tags_reward(["a </think> <answer>1</answer>", "<think> a </think>"], think_prefilled=True) == [1.0, 0.25]
    assert "format_tags" in REGISTRY
