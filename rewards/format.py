"""Format reward: the R1-Zero template ``<think> reasoning </think> <answer> answer </answer>``.

DeepSeek-R1 §2.2.2: "a format reward that enforces the model to put its thinking process between
'<think>' and '</think>' tags". The strict variant (registered as "format") pays 1.0 only for
exactly one non-empty think block followed by exactly one non-empty answer block, with nothing but
whitespace before ``<think>``, between the blocks and after ``</answer>``, and no tag nested or
repeated. The soft variant ("format_soft") pays 0.5 for a single non-empty think block and 0.5 for
a single non-empty answer block after it, and tolerates surrounding text. Neither pays for empty
tags or for two blocks (open-r1's regex reward pays for ``<think></think>`` and, unanchored, for
a second block; these do not). The tag-count variant ("format_tags", after open-r1's
``tag_count_reward``) pays 0.25 for each of the four tags written exactly once, in any order: a
dense signal for a model that writes the tags only now and then (SmolLM2-135M under R1's
instruction), which the two block rewards above would leave at 0 for most samples. It pays for
tags whatever they hold: with no accuracy signal, SmolLM2 under GRPO collapsed to 8-token
``<answer>11</answer>`` guesses within 15 steps (measured), so weight it below the accuracy reward.

When the prompt already opened ``<think>`` (the R1-Zero template can end with it), the completion
starts inside the think block: pass ``think_prefilled=True`` or the prompts (TRL passes
``prompts``; a ``prompt`` column works too) and a prompt ending in ``<think>`` is detected. A
completion that then opens ``<think>`` again has a repeated tag.
"""
from __future__ import annotations

import re
from typing import Any

from rewards.registry import Score, column, register, text_item

_TAG = re.compile(r"</?(?:think|answer)>")
_EXPECTED = ["<think>", "</think>", "<answer>", "</answer>"]
THINK_OPEN = "<think>"


def prompt_opens_think(prompt: Any) -> bool:
    """True when a prompt (a string, or chat messages ending with one) ends inside ``<think>``."""
    if isinstance(prompt, (list, tuple)) and prompt:
        last = prompt[-1]
        prompt = last.get("content", "") if isinstance(last, dict) else last
    return isinstance(prompt, str) and prompt.rstrip().endswith(THINK_OPEN)


def _tags(text: str) -> list[re.Match]:
    return list(_TAG.finditer(text))


@text_item
def format_item(completion: str, think_prefilled: bool = False, prompt: Any = None,
                **_: Any) -> tuple[Score, str]:
    """Strict R1 format check; returns (1.0 | 0.0, reason)."""
    text = THINK_OPEN + completion if (think_prefilled or prompt_opens_think(prompt)) else completion
    tags = _tags(text)
    names = [m.group() for m in tags]
    if names != _EXPECTED:
        return 0.0, _describe_tags(names)
    t_open, t_close, a_open, a_close = tags
    if text[:t_open.start()].strip():
        return 0.0, "text before <think>"
    if not text[t_open.end():t_close.start()].strip():
        return 0.0, "empty think block"
    if text[t_close.end():a_open.start()].strip():
        return 0.0, "text between </think> and <answer>"
    if not text[a_open.end():a_close.start()].strip():
        return 0.0, "empty answer block"
    if text[a_close.end():].strip():
        return 0.0, "text after </answer>"
    return 1.0, "well-formed"


def _describe_tags(names: list[str]) -> str:
    for tag in _EXPECTED:
        count = names.count(tag)
        if count == 0:
            return f"missing {tag}"
        if count > 1:
            return f"repeated {tag}"
    return "tags out of order"


@text_item
def format_soft_item(completion: str, think_prefilled: bool = False, prompt: Any = None,
                     **_: Any) -> tuple[Score, str]:
    """Partial credit: 0.5 for one non-empty think block, 0.5 for one non-empty answer after it."""
    text = THINK_OPEN + completion if (think_prefilled or prompt_opens_think(prompt)) else completion
    tags = _tags(text)
    names = [m.group() for m in tags]
    think_ok = answer_ok = False
    think_end = 0
    if names.count("<think>") == 1 and names.count("</think>") == 1:
        o, c = tags[names.index("<think>")], tags[names.index("</think>")]
        think_ok = o.end() <= c.start() and bool(text[o.end():c.start()].strip())
        think_end = c.end()
        inner = [m for m in tags if o.end() <= m.start() < c.start()]
        think_ok = think_ok and not inner
    if names.count("<answer>") == 1 and names.count("</answer>") == 1:
        o, c = tags[names.index("<answer>")], tags[names.index("</answer>")]
        answer_ok = (think_end <= o.start() and o.end() <= c.start()
                     and bool(text[o.end():c.start()].strip()))
    score = 0.5 * think_ok + 0.5 * answer_ok
    reason = {(True, True): "think and answer blocks", (True, False): "think block only",
              (False, True): "answer block only", (False, False): "no valid block"}
    return score, reason[(think_ok, answer_ok)]


def _batch(item, completions: list[str], columns: dict[str, Any]) -> list[Score]:
    n = len(completions)
    prefilled = column(columns, "think_prefilled", n, False)
    prompts = columns.get("prompts", columns.get("prompt"))
    prompts = column({"p": prompts}, "p", n, None) if prompts is not None else [None] * n
    return [item(c, p, q)[0] for c, p, q in zip(completions, prefilled, prompts)]


def format_reward(completions: list[str], **columns: Any) -> list[Score]:
    """Strict R1-Zero format reward, 1.0 or 0.0 per completion."""
    return _batch(format_item, completions, columns)


def format_soft_reward(completions: list[str], **columns: Any) -> list[Score]:
    """Soft format reward: 0, 0.5 or 1.0 per completion."""
    return _batch(format_soft_item, completions, columns)


@text_item
def format_tags_item(completion: str, think_prefilled: bool = False, prompt: Any = None,
                     **_: Any) -> tuple[Score, str]:
    """0.25 for each of <think>, </think>, <answer>, </answer> present exactly once."""
    text = THINK_OPEN + completion if (think_prefilled or prompt_opens_think(prompt)) else completion
    names = [m.group() for m in _tags(text)]
    once = [t for t in _EXPECTED if names.count(t) == 1]
    return 0.25 * len(once), f"{len(once)} of 4 tags once" + (f" ({', '.join(once)})" if once else "")


def format_tags_reward(completions: list[str], **columns: Any) -> list[Score]:
    """Tag-count format reward: 0, 0.25, 0.5, 0.75 or 1.0 per completion."""
    return _batch(format_tags_item, completions, columns)


format_reward = register("format", format_item)(format_reward)
format_tags_reward = register("format_tags", format_tags_item)(format_tags_reward)
format_soft_reward = register("format_soft", format_soft_item)(format_soft_reward)
