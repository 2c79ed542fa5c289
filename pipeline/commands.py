"""`r1flow run` and `r1flow stage`: validate first, then hand the work to the Prefect flows.

Without `PREFECT_API_URL` Prefect runs in its local ephemeral mode (nothing to start); with it set,
runs are recorded on that server and show in its UI. A run that places stages on work pools
(`run.work_pools`) needs the server and its pools, checked before anything is recorded.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from artifacts import RunStore
from pipeline.config import STAGES, ConfigError, RunConfig, apply_overrides, load_config, validate
from pipeline.pools import check_pools
from pipeline.runner import all_cached, record_cached_run, run_owner_lock, update_run_config
from pipeline.runs_view import run_summary


def _print_table(root: Path, run_id: str, file=sys.stdout) -> None:
    record = RunStore(root).load(run_id)
    print(f"\nrun {run_id}: {record.status}", file=file)
    for name, e in record.stages.items():
        secs = f"{e.seconds:7.1f}s" if e.seconds is not None else " " * 8
        print(f"  {name:<19} {e.status:<8} {secs}  {e.path or ''}", file=file)


def check_new_run_id(root: Path, run_id: str | None, overwrite: bool) -> None:
    """Refuse to replace an existing run's record (its stages' history would be lost)."""
    if run_id is not None and not overwrite and RunStore(root).exists(run_id):
        raise ConfigError(f"run {run_id!r} already exists under {Path(root) / 'runs'}; choose another --run-id, "
                          f"rerun its stages with `r1flow stage NAME --run {run_id}`, or pass --overwrite "
                          "to replace its record (artifacts are kept and reused)")


@contextmanager
def _prefect_session(root: Path, run_id: str, verbose: bool) -> Iterator[None]:
    """Prefect's temporary server bound to this process; user errors as one line plus the log path."""
    from pipeline.prefect_setup import start_ephemeral_server, user_facing_logs

    start_ephemeral_server()
    log_path = root / "runs" / run_id / "r1flow.log"
    with user_facing_logs(log_path, verbose=verbose):
        try:
            yield
        except Exception as e:
            from pipeline.cli import _is_user_error

            if _is_user_error(e) and not verbose:
                print(f"(full log with tracebacks: {log_path}; or rerun with --verbose)", file=sys.stderr)
            raise


def stage_span(from_stage: str | None, until_stage: str | None) -> tuple[list[str], list[str]]:
    """`run --from X --until Y`: the stages to go through (up to Y), and those before X (reuse only)."""
    start = STAGES.index(from_stage) if from_stage else 0
    stop = STAGES.index(until_stage) + 1 if until_stage else len(STAGES)
    if start >= stop:
        raise ConfigError(f"--from {from_stage} comes after --until {until_stage}; stages run in the order "
                          + " -> ".join(STAGES))
    return list(STAGES[:stop]), list(STAGES[:start])


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.config, args.overrides)  # every stage validated before work
    stages, reuse_only = stage_span(getattr(args, "from_stage", None), getattr(args, "until_stage", None))
    root = Path(args.root)
    check_new_run_id(root, args.run_id, args.overwrite)
    check_pools(cfg.run)  # run.work_pools: a server and the pools, before any record or work
    record = RunStore(root).create(cfg.to_dict(), STAGES, preset=args.preset, run_id=args.run_id)
    human = sys.stderr if args.json else sys.stdout  # with --json, stdout is one JSON document
    print(f"r1flow run {record.run_id} (preset {args.preset}, root {root})", file=human, flush=True)
    try:
        if _nothing_to_orchestrate(cfg, stages, root):
            # Every stage is in the cache and no Prefect server records flow runs: take them without
            # starting Prefect's temporary server (most of a cached rerun's time otherwise).
            print("every stage is cached: recording the run without starting Prefect", file=human, flush=True)
            record_cached_run(cfg, record.run_id, root, stages, log=lambda msg: print(msg, file=human, flush=True))
        else:
            from prefect import tags

            from pipeline.flows import r1_pipeline

            with _prefect_session(root, record.run_id, getattr(args, "verbose", False)), \
                    tags("r1flow", f"preset:{args.preset}"):
                r1_pipeline(run_id=record.run_id, root=str(root), stages=stages, reuse_only=reuse_only)
    finally:
        _print_table(root, record.run_id, file=human)
        if args.json:
            print(json.dumps(run_summary(RunStore(root).load(record.run_id)), default=str))
    return 0


def _nothing_to_orchestrate(cfg: RunConfig, stages: list[str], root: Path) -> bool:
    """A run that Prefect would only watch reuse artifacts: every stage cached, no work pool, and no
    Prefect server configured (with one, every run shows in its UI, cached stages as `Cached`)."""
    from pipeline.flows import server_configured

    return not cfg.run.work_pools and not server_configured() and all_cached(cfg, stages, root)


def cmd_stage(args: argparse.Namespace) -> int:
    from prefect import tags

    from pipeline.flows import r1_pipeline, stage_flow

    root = Path(args.root)
    runs = RunStore(root)
    record = runs.load(args.run_id)  # a clear error for an unknown run before Prefect starts
    effective = validate(apply_overrides(record.config, args.overrides), preset=record.preset)
    check_pools(effective.run)
    with run_owner_lock(root, args.run_id, effective.run):  # ... and for a run another process is building
        if args.overrides:
            update_run_config(root, args.run_id, args.overrides)
        with _prefect_session(root, args.run_id, getattr(args, "verbose", False)), \
                tags("r1flow", f"preset:{record.preset}"):
            if args.downstream:  # this stage, then every later one (each reused when its inputs are unchanged)
                later = list(STAGES[STAGES.index(args.name):])
                results = r1_pipeline(run_id=args.run_id, root=str(root), stages=later,
                                      force=[args.name] if args.force else None)
            else:
                results = [stage_flow(name=args.name, run_id=args.run_id, root=str(root), force=args.force)]
    for result in results:
        print(f"{result['stage']}: {result['status']} -> {result['path']}", file=sys.stderr if args.json else sys.stdout)
    _print_table(root, args.run_id) if not args.json else None
    if args.json:
        print(json.dumps(run_summary(runs.load(args.run_id)), default=str))
    return 0
