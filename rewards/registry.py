"""Reward registry and weighted combination.

Every reward follows the TRL / open-r1 convention
``fn(completions: list[str], **columns) -> list[float | None]``: one score per completion, the
dataset columns passed as keyword lists (``answer=[...]``, ``language=[...]``), unknown columns
ignored. ``None`` means "cannot judge" (an unparseable reference, an unknown language code): it is
counted and logged by :func:`combine`, and left out of the weighted sum rather than scored as 0.

Each reward also has a per-item form ``item(completion, **row) -> (score, reason)`` for inspecting
rollouts one at a time; :func:`explain` dispatches to it by name.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

_log = logging.getLogger("r1flow.rewards")

Score = float | None


class RewardFn(Protocol):
    def __call__(self, completions: list[str], **columns: Any) -> list[Score]: ...


ItemFn = Callable[..., tuple[Score, str]]

REGISTRY: dict[str, RewardFn] = {}
ITEM_FORMS: dict[str, ItemFn] = {}


def completion_text(completion: Any) -> str | None:
    """A completion as text: a string, or TRL's conversational form (a list of messages, the last
    one's ``content``); None for anything else (None, bytes, numbers), which rewards score 0."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion:
        last = completion[-1]
        content = last.get("content") if isinstance(last, Mapping) else None
        return content if isinstance(content, str) else None
    return None


def text_item(item: ItemFn) -> ItemFn:
    """Make an item form take any completion: a non-text one scores 0.0 with a reason (never raises)."""

    @functools.wraps(item)
    def wrapped(completion: Any, *args: Any, **kwargs: Any) -> tuple[Score, str]:
        text = completion_text(completion)
        if text is None:
            return 0.0, f"completion is {type(completion).__name__}, not text"
        return item(text, *args, **kwargs)

    return wrapped


def register(name: str, item: ItemFn) -> Callable[[RewardFn], RewardFn]:
    """Register a batch reward under ``name`` together with its per-item form."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        REGISTRY[name] = fn
        ITEM_FORMS[name] = item
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """The batch reward registered under ``name``; a clear error names the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(REGISTRY)}") from None


def explain(name: str, completion: str, **row: Any) -> tuple[Score, str]:
    """Score one completion with the reward ``name`` and say why (row values are scalars)."""
    if name not in ITEM_FORMS:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(ITEM_FORMS)}")
    return ITEM_FORMS[name](completion, **row)


def column(columns: Mapping[str, Any], name: str, n: int, default: Any) -> list[Any]:
    """The per-row values of column ``name``: a list of length n, a scalar broadcast, or default.

    Raises a ValueError naming the column when a list has the wrong length, so a misaligned batch
    fails loudly instead of scoring completions against the wrong references.
    """
    value = columns.get(name)
    if value is None:
        return [default] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"column {name!r} has {len(value)} values for {n} completions")
    return [default if v is None else v for v in value]


class CombinedReward(NamedTuple):
    """Result of :func:`combine`.

    total: per completion, the sum of weight * score over the components that could judge it;
        None only when no component could.
    components: per reward name, its raw scores (None kept, so callers can log or inspect them).
    """

    total: list[Score]
    components: dict[str, list[Score]]

    def none_counts(self) -> dict[str, int]:
        """How many completions each component could not judge."""
        return {k: sum(s is None for s in v) for k, v in self.components.items()}


def combine(
    weights: Mapping[str, float],
    completions: list[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **columns: Any,
) -> CombinedReward:
    """Weighted sum of registered rewards, e.g. ``combine({"accuracy": 1, "format": 0.5}, ...)``.

    Args:
        weights: reward name -> weight; names must be registered. A zero weight still computes
            (and reports) the component, which is how a stage logs a reward it does not train on.
        completions: the model outputs.
        options: per-reward keyword arguments, e.g. ``{"overlong_penalty": {"max_length": 512}}``.
        **columns: dataset columns passed to every reward (``answer``, ``language``, ...).

    A None component is excluded from that completion's total (not scored as 0) and counted in a
    log line; within a GRPO group the same prompt yields the same None for every member, so
    excluding it leaves the group's relative advantages unchanged.
    """
    options = options or {}
    unknown = set(options) - set(weights)
    if unknown:
        raise KeyError(f"options given for rewards without a weight: {sorted(unknown)}")
    components: dict[str, list[Score]] = {}
    for name in weights:
        scores = get_reward(name)(completions, **options.get(name, {}), **columns)
        if len(scores) != len(completions):
            raise RuntimeError(f"reward {name!r} returned {len(scores)} scores for {len(completions)}")
        components[name] = scores
    total: list[Score] = []
    for i in range(len(completions)):
        parts = [weights[k] * s[i] for k, s in components.items() if s[i] is not None]
        total.append(float(sum(parts)) if parts else None)
    result = CombinedReward(total, components)
    nones = {k: v for k, v in result.none_counts().items() if v}
    if nones:
        _log.warning("rewards could not judge some completions (excluded from the total): %s", nones)
    return result
