"""`r1flow config show` and `r1flow config keys`: the resolved config, and every key it has.

`show` prints the config a run with the same --preset/--config/--set would use, validated, as TOML
that `--config` reads back (keys whose value is unset are left out, so their default applies).
`keys` lists every key of the `[run]` section and of each stage with its type, default and
description, read from the pydantic models themselves, so the list cannot drift from the code.
"""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipeline.config import STAGES, RunSettings, load_config, stage_module


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Sections of plain values as TOML; None values are left out (TOML has no null)."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def config_keys(section: str | None = None) -> list[dict[str, Any]]:
    """[{section, key, type, default, description}] for every key (of one section)."""
    models: dict[str, type[BaseModel]] = {"run": RunSettings}
    models.update({name: stage_module(name).Config for name in STAGES})
    out = []
    for name, model in models.items():
        if section is not None and name != section:
            continue
        for key, field in _fields(model):
            out.append({"section": name, "key": key, "type": _type_name(field.annotation),
                        "default": _default(field), "description": field.description or ""})
    return out


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, field) of a model; a field that is itself a model (rejection_sampling.orm) is
    listed key by key, as `--set stage.table.key=value` sets them."""
    out = []
    for key, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _fields(field.annotation, f"{prefix}{key}.")
        else:
            out.append((prefix + key, field))
    return out


def cmd_config(args: argparse.Namespace) -> int:
    if args.what == "show":
        cfg = load_config(args.preset, args.config, args.overrides)
        data = cfg.to_dict()
        print(json.dumps(data, indent=2) if args.json else to_toml(data), end="\n" if args.json else "")
        return 0
    keys = config_keys(args.stage)
    if args.json:
        print(json.dumps(keys, default=str))
        return 0
    width = max(len(f"{k['section']}.{k['key']}") for k in keys)
    for k in keys:
        default = json.dumps(k["default"], default=str)
        print(f"{k['section'] + '.' + k['key']:<{width}}  {k['type']:<28} default {default}"
              + (f"  — {k['description']}" if k["description"] else ""))
    return 0
