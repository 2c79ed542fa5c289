"""User reward functions named by reference in a stage's ``rewards`` table.

Three forms, beside the registered names (``accuracy``, ``format``, ...):

- ``"path/to/file.py:function"``: a Python file, imported from its path (relative paths from the
  directory r1flow runs in); its folder is on ``sys.path`` while it imports, so it may import its
  neighbours;
- ``"package.module:function"``: an importable module;
- ``"verl:<file.py or package.module>:compute_score"``: a verl-style scorer
  ``compute_score(data_source, solution_str, ground_truth, extra_info)`` returning a number or a
  dict with a ``"score"`` key (what verl's reward managers accept), called once per completion
  with the problem's ``data_source``, the completion's text, the problem's ``answer`` and
  ``extra_info``.

A TRL-style function is called as TRL calls it: ``fn(prompts=..., completions=...,
completion_ids=..., <every problem column>=..., trainer_state=..., log_extra=..., log_metric=...)``
and returns one float (or None: "not applicable") per completion.

Reward code named in a config is trusted code, like the config itself: it is imported and run.
A reference's source file is part of the stage's cache key (:func:`reward_sources`), so editing
the file reruns the stage. Modules are cached by the file's content, so an edit is picked up by the
next load even in the same process.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

from rewards.registry import Score, column, completion_texts

VERL_PREFIX = "verl:"


@dataclass(frozen=True)
class UserReward:
    """A loaded user reward.

    Attributes:
        reference: the reference as written in the config.
        fn: the batch reward in the TRL convention (a verl scorer comes wrapped).
        function: the function's name (the reward's default label).
        module_stem: the file's stem or the module's last component (labels clashing functions).
        source: the file whose bytes are part of the cache key (None for a built-in module).
    """

    reference: str
    fn: Callable[..., list[Score]]
    function: str
    module_stem: str
    source: Path | None


def is_reference(name: str) -> bool:
    """Whether a rewards-table key names a user reward rather than a registered one."""
    return ":" in name


def _parse(reference: str) -> tuple[bool, str, str]:
    verl = reference.startswith(VERL_PREFIX)
    body = reference[len(VERL_PREFIX):] if verl else reference
    target, sep, function = body.rpartition(":")
    if not sep or not target.strip() or not function.isidentifier():
        raise ValueError(f"reward {reference!r}: expected 'path/to/file.py:function', "
                         "'package.module:function' or 'verl:<file or module>:compute_score'")
    return verl, target.strip(), function


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_file(reference: str, path: Path) -> ModuleType:
    if not path.is_file():
        raise ValueError(f"reward {reference!r}: file {path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    name = f"r1flow_user_reward_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward {reference!r}: cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"reward {reference!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _import_module(reference: str, target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except Exception as e:
        raise ValueError(f"reward {reference!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from e


def _source_of(module: ModuleType, target: str) -> Path | None:
    if _is_path(target):
        return Path(target)
    file = getattr(module, "__file__", None)
    return Path(file) if file else None


def load_reward(reference: str) -> UserReward:
    """Import the function a reference names; ValueError naming the file/module and function."""
    verl, target, function = _parse(reference)
    module = _import_file(reference, Path(target).expanduser()) if _is_path(target) else _import_module(reference, target)
    where = target
    fn = getattr(module, function, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward {reference!r}: {where} has no function {function!r}"
                         + (f" (it defines: {', '.join(defined)})" if defined else ""))
    if not callable(fn):
        raise ValueError(f"reward {reference!r}: {where}:{function} is a {type(fn).__name__}, not a function")
    stem = Path(target).stem if _is_path(target) else target.rsplit(".", 1)[-1]
    batch = verl_reward(fn) if verl else fn
    return UserReward(reference, batch, function, stem, _source_of(module, target))


def check_reward_name(name: str) -> None:
    """Raise ValueError if ``name`` is neither a registered reward nor a loadable reference."""
    from rewards.registry import REGISTRY

    if name in REGISTRY:
        return
    if not is_reference(name):
        raise ValueError(f"unknown reward {name!r}; the built-in rewards are: {', '.join(sorted(REGISTRY))}; "
                         "a user reward is 'path/to/file.py:function', 'package.module:function' or "
                         "'verl:<file or module>:compute_score'")
    load_reward(name)


def reward_sources(names: Sequence[str]) -> dict[str, str]:
    """sha256 of the source file of every user reference among ``names`` (for cache keys)."""
    out = {}
    for name in names:
        if is_reference(name):
            source = load_reward(name).source
            if source is not None and source.is_file():
                out[name] = hashlib.sha256(source.read_bytes()).hexdigest()
    return out


def verl_reward(compute_score: Callable[..., Any]) -> Callable[..., list[Score]]:
    """A batch reward (TRL convention) calling a verl scorer once per completion, as verl's
    ``NaiveRewardManager`` does: ``compute_score(data_source=, solution_str=, ground_truth=,
    extra_info=)``; a dict result gives its ``"score"``."""

    def score(completions: Sequence[Any], answer: Any = None, data_source: Any = None,
              extra_info: Any = None, **columns: Any) -> list[Score]:
        texts = completion_texts(completions)
        n = len(texts)
        truths = column({"g": answer if answer is not None else columns.get("ground_truth")}, "g", n, None)
        sources = column({"d": data_source}, "d", n, None)
        extras = extra_info if isinstance(extra_info, list) else [extra_info] * n
        out: list[Score] = []
        for text, src, truth, extra in zip(texts, sources, truths, extras):
            r = compute_score(data_source=src, solution_str=text, ground_truth=truth, extra_info=extra)
            if isinstance(r, dict):
                if "score" not in r:
                    raise ValueError(f"{compute_score.__name__} returned a dict without 'score' (keys {sorted(r)})")
                r = r["score"]
            out.append(r)
        return out

    score.__name__ = getattr(compute_score, "__name__", "compute_score")
    return score
