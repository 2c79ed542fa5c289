"""Reward registry and weighted combination.

Every reward follows the TRL / open-r1 convention
``fn(completions: list[str], **columns) -> list[float | None]``: one score per completion, the
dataset columns passed as keyword lists (``answer=[...]``, ``language=[...]``), unknown columns
ignored. Registered rewards also take TRL's exact call (``GRPOTrainer._calculate_rewards``):
``prompts=``, ``completions=`` as strings or as conversational message lists
(``[[{"role": "assistant", "content": ...}]]``), ``completion_ids=`` (their lengths reach the
rewards as ``completion_lengths``), every dataset column, ``trainer_state=``, ``log_extra=``,
``log_metric=``; the conversational and the plain form score the same (:func:`trl_compatible`).

Besides the registered names, a weights table may name a user reward by reference
(``"path/to/file.py:fn"``, ``"package.module:fn"``, ``"verl:..."``, see :mod:`rewards.user`). ``None`` means "cannot judge" (an unparseable reference, an unknown language code): it is
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


def message_text(value: Any) -> Any:
    """The text of a conversational completion (a list of ``{"role", "content"}`` messages: the
    contents of its assistant turns, joined), or ``value`` unchanged when it is not one.

    TRL passes ``[{"role": "assistant", "content": text}]`` per completion when the dataset's
    prompts are conversational; open-r1's rewards read ``completion[0]["content"]``, which is the
    same text for the usual one-message completion.
    """
    if isinstance(value, dict) and "content" in value:
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return value  # not text: the rewards score it 0 (text_item)
    turns = [m for m in value if m.get("role", "assistant") == "assistant"] or list(value)
    return "".join(m["content"] for m in turns)


def completion_texts(completions: Sequence[Any]) -> list[Any]:
    """Plain texts of completions given as strings or as conversational message lists; anything
    else passes unchanged (the rewards score a non-text completion 0, see :func:`text_item`)."""
    if isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
        raise TypeError(f"completions must be a list (one per sample), got {type(completions).__name__}")
    return [message_text(c) for c in completions]


def trl_compatible(fn: Callable[..., list[Score]]) -> Callable[..., list[Score]]:
    """Let a text reward take TRL's call: conversational completions become their text, and
    ``completion_ids`` (one token-id list per completion) become ``completion_lengths`` unless the
    caller passed those. Every other keyword (``prompts``, the dataset columns, ``trainer_state``,
    ``log_extra``, ``log_metric``) goes through; the rewards ignore what they do not use."""

    @functools.wraps(fn)
    def call(completions: Sequence[Any], *args: Any, **kwargs: Any) -> list[Score]:
        ids = kwargs.pop("completion_ids", None)
        if ids is not None and kwargs.get("completion_lengths") is None:
            kwargs["completion_lengths"] = [len(x) for x in ids]
        return fn(completion_texts(completions), *args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


def register(name: str, item: ItemFn) -> Callable[[RewardFn], RewardFn]:
    """Register a batch reward under ``name`` together with its per-item form; returns the reward
    wrapped by :func:`trl_compatible` (assign it: ``fn = register("x", item)(fn)``)."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        wrapped = trl_compatible(fn)
        REGISTRY[name] = wrapped
        ITEM_FORMS[name] = item
        return wrapped

    return deco


def get_reward(name: str) -> RewardFn:
    """The reward registered under ``name``, or the user reward a reference names
    (``file.py:fn``, ``pkg.mod:fn``, ``verl:...``); a clear error names the known ones."""
    if name in REGISTRY:
        return REGISTRY[name]
    return _user_reward(name).fn


def _user_reward(name: str) -> Any:
    from rewards.user import is_reference, load_reward

    if not is_reference(name):
        raise KeyError(f"unknown reward {name!r}; known: {sorted(REGISTRY)}, or a user reward "
                       "'path/to/file.py:function' / 'package.module:function' / 'verl:...'")
    return load_reward(name)


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


class RewardError(ValueError):
    """A reward raised, or returned something other than one number (or None) per completion;
    the message names the reward."""


def reward_labels(names: Sequence[str]) -> dict[str, str]:
    """Per reward name or reference, the short name its scores go by (``components``, the
    ``reward_<label>`` rollout columns): a registered name is its own label, a user reference is
    labelled by its function (``my_rewards.py:length_bonus`` -> ``length_bonus``), or by
    ``<module>_<function>`` when two references share a function name."""
    labels = {n: (n if n in REGISTRY else _user_reward(n).function) for n in names}
    clashing = {lab for lab in labels.values() if list(labels.values()).count(lab) > 1}
    for n, lab in labels.items():
        if lab in clashing and n not in REGISTRY:
            labels[n] = f"{_user_reward(n).module_stem}_{lab}"
    if len(set(labels.values())) != len(labels):
        raise ValueError(f"rewards {sorted(labels)} give clashing column names {sorted(labels.values())}")
    return labels


def _scores(name: str, value: Any, n: int) -> list[Score]:
    """A reward's return value checked: a sequence of n numbers or None (NaN read as None)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise RewardError(f"reward {name!r} returned a {type(value).__name__}; expected a list of "
                          f"{n} numbers (one per completion)")
    if len(value) != n:
        raise RewardError(f"reward {name!r} returned {len(value)} scores for {n} completions")
    out: list[Score] = []
    for v in value:
        if v is None:
            out.append(None)
            continue
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            f = float(v)  # int, float, bool, numpy or torch scalars
        except (TypeError, ValueError):
            raise RewardError(f"reward {name!r} returned {v!r:.60} among its scores; expected numbers or None") from None
        out.append(None if f != f else f)
    return out


def combine(
    weights: Mapping[str, float],
    completions: Sequence[Any],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    **columns: Any,
) -> CombinedReward:
    """Weighted sum of rewards, e.g. ``combine({"accuracy": 1, "format": 0.5}, ...)``.

    Args:
        weights: reward name or user reference -> weight. A zero weight still computes (and
            reports) the component, which is how a stage logs a reward it does not train on.
        completions: the model outputs, strings or conversational message lists.
        options: per-reward keyword arguments, e.g. ``{"overlong_penalty": {"max_length": 512}}``.
        **columns: everything else the rewards get, as TRL passes it: dataset columns
            (``answer``, ``language``, ...), ``prompts``, ``completion_ids``, ``trainer_state``,
            ``log_extra``, ``log_metric``.

    Returns components keyed by :func:`reward_labels`. A None component is excluded from that
    completion's total (not scored as 0) and counted in a log line; within a GRPO group the same
    prompt yields the same None for every member, so excluding it leaves the group's relative
    advantages unchanged. A reward that raises or returns the wrong number of scores raises
    :class:`RewardError` naming it.
    """
    options = options or {}
    unknown = set(options) - set(weights)
    if unknown:
        raise KeyError(f"options given for rewards without a weight: {sorted(unknown)}")
    labels = reward_labels(list(weights))
    n = len(completions)
    components: dict[str, list[Score]] = {}
    for name in weights:
        fn = get_reward(name)
        try:
            value = fn(completions=completions, **options.get(name, {}), **columns)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
        components[labels[name]] = _scores(name, value, n)
    total: list[Score] = []
    for i in range(n):
        parts = [weights[k] * components[labels[k]][i] for k in weights if components[labels[k]][i] is not None]
        total.append(float(sum(parts)) if parts else None)
    result = CombinedReward(total, components)
    nones = {k: v for k, v in result.none_counts().items() if v}
    if nones:
        _log.warning("rewards could not judge some completions (excluded from the total): %s", nones)
    return result
