"""Scheduled distillation: `r1flow schedule distill ...` and `r1flow serve`.

Schedules live on a Prefect server, never in the ephemeral mode (its schedules do not fire):

    prefect server start                                  # SQLite under ~/.prefect by default
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    r1flow schedule distill --teacher RUN_ID --student tiny-student --cron "0 3 * * *"
    r1flow serve                                          # executes scheduled and manual runs
    prefect deployment run distill/<name>                 # a manual run works too

`schedule` validates the request (teacher run, its rejection-sampled data, student presets),
registers a deployment of `pipeline.flows:distill_flow` with the cron schedule and parameters,
and records the spec under `<root>/schedules/<name>.json`; `serve` serves every recorded spec.
The distill job writes its students into the teacher's run. Concurrency: every model stage holds
the device's global concurrency slot (limit 1), so a scheduled distill waits for a running flow.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from artifacts import ArtifactError, RunStore
from artifacts.store import atomic_write_text
from pipeline.config import ConfigError, apply_overrides, validate


def _need_server() -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "schedules need a Prefect server: run `prefect server start` and then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` (Prefect's ephemeral mode does not fire schedules)"
        )


def _check_cron(cron: str) -> None:
    from cronsim import CronSim, CronSimError
    from datetime import datetime

    try:
        CronSim(cron, datetime(2026, 1, 1))
    except CronSimError as e:
        raise ConfigError(f"--cron {cron!r}: not a cron expression ({e})") from e


def schedule_spec(root: Path, teacher: str, students: list[str], cron: str, name: str | None,
                  overrides: list[str]) -> dict[str, Any]:
    """Validate a scheduling request and return its spec (nothing is registered yet)."""
    record = RunStore(root).load(teacher)
    rs = record.stages.get("rejection_sampling")
    if rs is None or not rs.path:
        raise ArtifactError(f"teacher run {teacher} has no rejection_sampling artifact to distill from")
    _check_cron(cron)
    specs = [{"name": s, "model": s} for s in students]
    validate(apply_overrides(record.config, [f"distill.students={json.dumps(specs)}", *overrides]),
             preset=record.preset)  # unknown student presets and bad overrides fail here
    name = name or f"{teacher}-" + "-".join(students)
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"deployment name {name!r}: use letters, digits, '.', '-', '_'")
    return {"name": name, "teacher": teacher, "students": students, "cron": cron,
            "root": str(Path(root).resolve()), "overrides": overrides}


def build_deployment(spec: dict[str, Any]):
    from prefect.deployments.runner import EntrypointType

    from pipeline.flows import distill_flow

    return distill_flow.to_deployment(
        name=spec["name"],
        cron=spec["cron"],
        parameters={"teacher_run": spec["teacher"], "students": spec["students"], "root": spec["root"],
                    "overrides": spec["overrides"]},
        tags=["r1flow", "distill"],
        description=f"distill run {spec['teacher']} into {', '.join(spec['students'])}",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def schedules_dir(root: Path) -> Path:
    return Path(root) / "schedules"


def cmd_schedule(args: argparse.Namespace) -> int:
    _need_server()
    root = Path(args.root)
    spec = schedule_spec(root, args.teacher, args.student, args.cron, args.name, args.overrides)
    deployment_id = build_deployment(spec).apply()
    schedules_dir(root).mkdir(parents=True, exist_ok=True)
    atomic_write_text(schedules_dir(root) / f"{spec['name']}.json", json.dumps(spec, indent=2))
    print(f"scheduled deployment distill/{spec['name']} ({deployment_id}) cron {spec['cron']!r}")
    print("run `r1flow serve` to execute its runs; trigger one now with "
          f"`prefect deployment run distill/{spec['name']}`")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _need_server()
    specs = [json.loads(p.read_text()) for p in sorted(schedules_dir(Path(args.root)).glob("*.json"))]
    if not specs:
        raise ConfigError(f"nothing to serve: no schedules under {schedules_dir(Path(args.root))}; "
                          "create one with `r1flow schedule distill ...`")
    serve_until_stopped([build_deployment(s) for s in specs], limit=args.limit)
    print("r1flow serve: stopped (the served schedules are paused until the next `r1flow serve`)", file=sys.stderr)
    return 0


def serve_until_stopped(deployments: list, limit: int | None) -> None:
    """Prefect's `serve`, stopped the same clean way by Ctrl-C and by SIGTERM.

    Ctrl-C asks the runner to stop (`Runner.astop`: its polling loops end, then it pauses its
    schedules and exits) rather than cancelling the task that runs it: a cancellation that lands
    while the runner finishes a flow run was absorbed and left `serve` running (seen in CI, with
    every thread idle in its event loop). Prefect's runner answers SIGTERM by calling its async
    `stop` from a signal handler (the coroutine is never awaited, then `sys.exit` lands inside the
    event loop); here SIGTERM takes Ctrl-C's path instead.
    """
    import asyncio
    import contextlib
    import signal

    from prefect.runner import Runner

    class _Runner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            signal.raise_signal(signal.SIGINT)

    runner = _Runner(pause_on_shutdown=True, limit=limit)
    for deployment in deployments:
        runner.add_deployment(deployment)
    print("serving " + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
          + "; trigger one with `prefect deployment run NAME`; Ctrl-C stops", file=sys.stderr, flush=True)

    async def serve() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        serving = asyncio.ensure_future(runner.start())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not serving.done():
            if runner.started:
                await runner.astop()
            else:  # Ctrl-C before the runner came up: nothing to pause yet
                serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
