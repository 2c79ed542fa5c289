"""`r1flow`: the user's verbs (DESIGN.md, "The user's verbs").

    r1flow run [--preset tiny] [--config FILE] [--set stage.key=value ...] [--run-id ID] [--from S] [--until S] [--json]
    r1flow stage NAME --run RUN_ID [--force] [--set ...]
    r1flow inspect RUN_ID/STAGE[/FILE] | PATH [--rows N] [--columns ...] [--where ...] [--width N|--full] [--json]
    r1flow runs [--json]
    r1flow report RUN_ID
    r1flow config show [--preset P] [--config FILE] [--set ...] | r1flow config keys [STAGE]
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("r1flow")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (flags and options without one excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        hidden = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)
        if hidden:
            return action.help or ""
        return super()._get_help_string(action)


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, default=None,
                   help="where runs and artifacts live (default: $R1FLOW_ROOT or ./r1flow-data)")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one setting, e.g. --set sft.lr=1e-4 (repeatable; values are TOML literals)")


def _add_config(p: argparse.ArgumentParser, preset_default: str | None) -> None:
    p.add_argument("--preset", default=preset_default, help="shipped preset: tiny, micro, smollm2-135m")
    p.add_argument("--config", type=Path, default=None, help="TOML, YAML or JSON file merged over the preset")
    _add_overrides(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1flow",
        description="The DeepSeek-R1 recipe as a pipeline: " + " -> ".join(STAGES),
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"r1flow {_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_Help)

    p = verb("run", "run the full flow (every stage; cached stages are reused)")
    _add_config(p, "tiny")
    _add_root(p)
    p.add_argument("--run-id", default=None, help="name the run (default: a timestamp id); an existing id is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="with --run-id of an existing run: replace its record (its artifacts stay in the cache)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON document on stdout (run id and per-stage map); "
                        "progress and the table go to stderr")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors (always in the run's log)")
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                   help="start at this stage: the stages before it are reused from the cache, never computed "
                        "(an uncached one is an error)")
    p.add_argument("--until", dest="until_stage", choices=STAGES, default=None,
                   help="stop after this stage; the run reads `partial` and "
                        "`r1flow stage NEXT --run ID --downstream` continues it")

    p = verb("stage", "rerun one stage of an existing run, reusing its upstream")
    p.add_argument("name", choices=STAGES, help="the stage to rerun")
    p.add_argument("--run", dest="run_id", required=True, help="the run whose stage to rerun")
    p.add_argument("--force", action="store_true", help="recompute even on a cache hit")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of user errors (always in the run's log)")
    p.add_argument("--downstream", action="store_true",
                   help="then bring every later stage up to date (recomputes what is stale, reuses the rest)")
    _add_overrides(p)
    p.add_argument("--json", action="store_true", help="print the run as one JSON document (as `runs --json`)")
    _add_root(p)

    p = verb("inspect", "look at a dataset: schema, stats, first rows")
    p.add_argument("target", help="RUN_ID/STAGE[/DATASET], an artifact directory, or a .parquet file")
    p.add_argument("--rows", type=int, default=5, help="how many rows to show (0 or more)")
    p.add_argument("--columns", nargs="+", default=None, help="only these columns")
    p.add_argument("--where", action="append", default=None, metavar="'COL OP VALUE'",
                   help="filter rows, op one of == != > >= < <= ~ (substring); repeat to AND")
    p.add_argument("--width", type=int, default=40, help="characters shown of each cell")
    p.add_argument("--full", action="store_true", help="show cells whole (long completions included)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_root(p)

    p = verb("runs", "list runs with their stages' status and headline metrics")
    p.add_argument("--json", action="store_true", help="print one JSON list of runs (as `run --json` prints one)")
    _add_root(p)

    p = verb("verify", "re-hash every file of a run's artifacts (or of one artifact directory)")
    p.add_argument("target", help="RUN_ID or an artifact directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_root(p)

    p = verb("report", "write a Markdown report with plots for a run")
    p.add_argument("run_id", help="the run to report on")
    p.add_argument("--out", type=Path, default=None, help="directory (default: the run's report/)")
    _add_root(p)

    p = verb("config", "show the resolved config, or every key with its type, default and description")
    cp = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    c = cp.add_parser("show", help="print the config a run would use (TOML; --json for JSON)", formatter_class=_Help)
    _add_config(c, "tiny")
    c.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    c = cp.add_parser("keys", help="list every key of every stage (or one)", formatter_class=_Help)
    c.add_argument("stage", nargs="?", choices=("run", *STAGES), help="only this section")
    c.add_argument("--json", action="store_true", help="print one JSON list")

    p = verb("schedule", "schedule distillation jobs on a Prefect server")
    sp = p.add_subparsers(dest="what", required=True)
    d = sp.add_parser("distill", help="a cron-scheduled deployment of the distill flow", formatter_class=_Help)
    d.add_argument("--teacher", required=True, help="run id whose rejection-sampled data teaches")
    d.add_argument("--student", action="append", required=True, help="student preset name (repeatable)")
    d.add_argument("--cron", required=True, help='cron string, e.g. "0 3 * * *"')
    d.add_argument("--name", default=None, help="deployment name (default: TEACHER-STUDENTS)")
    _add_overrides(d)
    _add_root(d)

    p = verb("serve", "serve scheduled deployments (needs a Prefect server)")
    p.add_argument("--limit", type=int, default=1, help="most flow runs executed at once")
    _add_root(p)

    p = verb("generate", "sample from any model r1flow can load")
    p.add_argument("--model", required=True,
                   help="RUN_ID/STAGE (RUN_ID/distill, RUN_ID/student:NAME), a checkpoint dir, a .gguf path, or a preset")
    p.add_argument("--prompt", required=True, help="the question (or raw text with --template none)")
    p.add_argument("--template", default="auto",
                   help="prompt template: auto (the one the checkpoint was trained with; none if unknown), "
                        "none (the prompt as given), or a name: r1_zero, r1_zero_short, chat")
    p.add_argument("--chat", action="store_true", help="same as --template chat (the model's own chat template)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens generated")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16, or auto (the checkpoint's)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token ids, log-probs, top log-probs")
    _add_root(p)

    p = verb("export", "write a model for transformers / vLLM (hf), llama.cpp (gguf) or PEFT")
    p.add_argument("source", help="what `generate --model` takes: RUN_ID/STAGE, a student, a checkpoint dir, ...")
    p.add_argument("out", type=Path, help="output directory (hf, peft) or .gguf file")
    p.add_argument("--format", required=True, choices=["hf", "gguf", "peft"],
                   help="hf (transformers / vLLM directory), gguf (llama.cpp file) or peft (LoRA adapter)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "f16", "q8_0"],
                   help="weights' type (q8_0: GGUF only)")
    p.add_argument("--merge-lora", action="store_true", help="SOURCE is a PEFT adapter: merge it into its base")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_root(p)
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect import inspect_dataset, render, resolve

    info = inspect_dataset(resolve(args.target, args.root), rows=args.rows, columns=args.columns, where=args.where)
    width = 0 if args.full else args.width
    print(json.dumps(info, default=str, ensure_ascii=False) if args.json else render(info, width))
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
    "config": _dispatch("pipeline.config_cli", "cmd_config"),
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
