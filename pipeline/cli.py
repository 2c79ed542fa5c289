"""`r1flow`: the user's verbs (DESIGN.md, "The user's verbs").

    r1flow run [--preset tiny] [--config FILE] [--set stage.key=value ...]
    r1flow stage NAME --run RUN_ID [--force] [--set ...]
    r1flow inspect RUN_ID/STAGE[/FILE] | PATH [--rows N] [--columns ...] [--where ...] [--json]
    r1flow runs [--json]
    r1flow report RUN_ID
    r1flow schedule distill --teacher RUN_ID --student NAME [--student ...] --cron "..."
    r1flow serve
    r1flow generate --model SOURCE --prompt TEXT
    r1flow verify RUN_ID | ARTIFACT_DIR
    r1flow export SOURCE OUT --format hf|gguf|peft [--dtype fp32|bf16|f16|q8_0] [--merge-lora] [--force]

Every verb takes `--root DIR` (default `$R1FLOW_ROOT` or ./r1flow-data). Errors the user can fix
(bad config, missing artifact, bad input file) print one clear message and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from artifacts import ArtifactError
from artifacts.store import default_root
from pipeline.config import STAGES, ConfigError


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=None,
                   help="where runs and artifacts live (default: $R1FLOW_ROOT or ./r1flow-data)")


def _add_config(p: argparse.ArgumentParser, preset_default: str | None) -> None:
    p.add_argument("--preset", default=preset_default, help="shipped preset: tiny (default), micro, smollm2-135m")
    p.add_argument("--config", type=Path, default=None, help="TOML/JSON file merged over the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one setting, e.g. --set sft.lr=1e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1flow",
        description="The DeepSeek-R1 recipe as a pipeline: "
        + " -> ".join(STAGES),
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("run", help="run the full flow (every stage; cached stages are reused)")
    _add_config(p, "tiny")
    _add_root(p)
    p.add_argument("--run-id", default=None, help="name the run (default: a timestamp id)")
    p.add_argument("--json", action="store_true", help="end with one JSON line: run id and per-stage map")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors (always in the run's log)")

    p = sub.add_parser("stage", help="rerun one stage of an existing run, reusing its upstream")
    p.add_argument("name", choices=STAGES)
    p.add_argument("--run", dest="run_id", required=True, help="the run whose stage to rerun")
    p.add_argument("--force", action="store_true", help="recompute even on a cache hit")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors (always in the run's log)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")
    p.add_argument("--json", action="store_true")
    _add_root(p)

    p = sub.add_parser("inspect", help="look at a dataset: schema, stats, first rows")
    p.add_argument("target", help="RUN_ID/STAGE[/DATASET], an artifact directory, or a .parquet file")
    p.add_argument("--rows", type=int, default=5, help="how many rows to show (default 5)")
    p.add_argument("--columns", nargs="+", default=None, help="only these columns")
    p.add_argument("--where", action="append", default=None, metavar="'COL OP VALUE'",
                   help="filter rows, op one of == != > >= < <= ~ (substring); repeat to AND")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_root(p)

    p = sub.add_parser("runs", help="list runs with their stages' status and headline metrics")
    p.add_argument("--json", action="store_true")
    _add_root(p)

    p = sub.add_parser("verify", help="re-hash every file of a run's artifacts (or of one artifact directory)")
    p.add_argument("target", help="RUN_ID or an artifact directory")
    p.add_argument("--json", action="store_true")
    _add_root(p)

    p = sub.add_parser("report", help="write a Markdown report with plots for a run")
    p.add_argument("run_id")
    p.add_argument("--out", type=Path, default=None, help="directory (default: the run's report/)")
    _add_root(p)

    p = sub.add_parser("schedule", help="schedule distillation jobs on a Prefect server")
    sp = p.add_subparsers(dest="what", required=True)
    d = sp.add_parser("distill", help="a cron-scheduled deployment of the distill flow")
    d.add_argument("--teacher", required=True, help="run id whose rejection-sampled data teaches")
    d.add_argument("--student", action="append", required=True, help="student preset name (repeatable)")
    d.add_argument("--cron", required=True, help='cron string, e.g. "0 3 * * *"')
    d.add_argument("--name", default=None, help="deployment name")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE")
    _add_root(d)

    p = sub.add_parser("serve", help="serve scheduled deployments (needs a Prefect server)")
    p.add_argument("--limit", type=int, default=1, help="most flow runs executed at once (default 1)")
    _add_root(p)

    p = sub.add_parser("generate", help="sample from any model r1flow can load")
    p.add_argument("--model", required=True, help="a checkpoint dir, RUN_ID/STAGE, a .gguf path, or a preset")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat / R1 template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--json", action="store_true")
    _add_root(p)

    p = sub.add_parser("export", help="write a model for transformers / vLLM (hf), llama.cpp (gguf) or PEFT")
    p.add_argument("source", help="what `generate --model` takes: RUN_ID/STAGE, a student, a checkpoint dir, ...")
    p.add_argument("out", type=Path, help="output directory (hf, peft) or .gguf file")
    p.add_argument("--format", required=True, choices=["hf", "gguf", "peft"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "f16", "q8_0"],
                   help="weights' type (q8_0: GGUF only; default fp32)")
    p.add_argument("--merge-lora", action="store_true", help="SOURCE is a PEFT adapter: merge it into its base")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_root(p)
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect import inspect_dataset, render, resolve

    info = inspect_dataset(resolve(args.target, args.root), rows=args.rows, columns=args.columns, where=args.where)
    print(json.dumps(info, default=str, ensure_ascii=False) if args.json else render(info))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.runs_view import list_runs

    print(list_runs(args.root, as_json=args.json))
    return 0


def _dispatch(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(args)

    return call


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _dispatch("pipeline.commands", "cmd_run"),
    "stage": _dispatch("pipeline.commands", "cmd_stage"),
    "inspect": cmd_inspect,
    "runs": cmd_runs,
    "verify": _dispatch("pipeline.verify", "cmd_verify"),
    "report": _dispatch("pipeline.report", "cmd_report"),
    "schedule": _dispatch("pipeline.schedule", "cmd_schedule"),
    "serve": _dispatch("pipeline.schedule", "cmd_serve"),
    "generate": _dispatch("pipeline.generate", "cmd_generate"),
    "export": _dispatch("pipeline.export", "cmd_export"),
}


def _is_user_error(e: Exception) -> bool:
    """Errors the user can fix (config, data, model files): one message, no traceback."""
    if isinstance(e, (ConfigError, ArtifactError)):
        return True
    lm_errors = []
    for module, name in (("lm.gguf", "LoadError"), ("lm.checkpoint", "CheckpointError"),
                         ("lm.model", "ModelConfigError"), ("pipeline.export", "ExportError")):
        mod = sys.modules.get(module)  # only if already imported: no torch import just to check
        if mod is not None and hasattr(mod, name):
            lm_errors.append(getattr(mod, name))
    return isinstance(e, tuple(lm_errors)) if lm_errors else False


# Prefect settings r1flow picks when the user has not: no usage telemetry from the ephemeral server
# (offline machines logged "ERROR ... Failed to send telemetry" on every run), and time for that
# server to start on a loaded machine (Prefect's 20 s default timed out on the 2-core reference box).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def _prefect_defaults() -> None:
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    _prefect_defaults()
    args = build_parser().parse_args(argv)
    if getattr(args, "root", None) is None:
        args.root = default_root()
    try:
        return COMMANDS[args.verb](args)
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"r1flow {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"r1flow {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
