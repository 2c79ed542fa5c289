"""Rewards: pure functions on text (no torch, no Prefect), registered by name.

Each reward is ``fn(completions: list[str], **columns) -> list[float | None]`` (the TRL / open-r1
convention) with a per-item form returning ``(score, reason)``:

=====================  ==========================================  =============================
name                   batch function                              per-item form
=====================  ==========================================  =============================
accuracy               :func:`accuracy_reward` (``answer``)        :func:`accuracy.accuracy_item`
format                 :func:`format_reward` (strict)              :func:`format.format_item`
format_soft            :func:`format_soft_reward`                  :func:`format.format_soft_item`
format_tags            :func:`format_tags_reward` (tag count)      :func:`format.format_tags_item`
language_consistency   :func:`language_consistency_reward`         ``language.language_consistency_item``
overlong_penalty       :func:`overlong_penalty` (DAPO, optional)   ``penalties.overlong_item``
repetition_penalty     :func:`repetition_penalty` (optional)       ``penalties.repetition_item``
=====================  ==========================================  =============================

:func:`combine` sums them with weights from a config. Importing this package does not import
sympy: symbolic comparisons run in worker processes started on first need.
"""
from rewards.accuracy import accuracy_details, accuracy_item, accuracy_reward, verify
from rewards.format import (format_item, format_reward, format_soft_item, format_soft_reward, format_tags_item,
                            format_tags_reward)
from rewards.language import language_consistency_item, language_consistency_reward
from rewards.penalties import overlong_penalty, repetition_penalty
from rewards.registry import ITEM_FORMS, REGISTRY, CombinedReward, combine, explain, get_reward

__all__ = [
    "REGISTRY", "ITEM_FORMS", "CombinedReward", "combine", "explain", "get_reward",
    "accuracy_reward", "accuracy_item", "accuracy_details", "verify",
    "format_reward", "format_item", "format_soft_reward", "format_soft_item", "format_tags_reward", "format_tags_item",
    "language_consistency_reward", "language_consistency_item",
    "overlong_penalty", "repetition_penalty",
]
