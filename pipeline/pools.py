"""Placing stages on Prefect work pools: `[run] work_pools = {rl_zero = "gpu", distill = "gpu-small"}`.

A placed stage runs as a flow run of the deployment `r1flow_placed_stage/<pool>` (the flow
`pipeline.flows.placed_stage_flow`, which runs ONE stage of a run through the same task, cache and
run record as a local stage), executed by a worker of that pool (`prefect worker start --pool gpu`).
The driving flow (`r1flow run` on a laptop, say) calls `prefect.deployments.run_deployment` and
waits; the other stages run in its own process, as without `work_pools`. Stages hand each other
artifacts through the artifact root, so that root must be one shared filesystem (NFS, ...) mounted
at the same path on the driver and on every worker host.

Registration: placing a stage (from `r1flow run`, `r1flow stage`, a scheduled distill, or a flow
called from Python) creates or updates the deployment of its pool, with a module-path entrypoint
(`pipeline.flows.placed_stage_flow`), as `r1flow schedule` does for distill; nothing to deploy by
hand. A `process` worker therefore runs the r1flow installed (or on `PYTHONPATH`) on its own host;
no image or code upload is involved. The worker's code must be the driver's: the placed flow
compares its `code_version()` (part of every cache key) with the driver's.

Handshake. Before starting the flow run the driver writes `<root>/runs/<run>/placed/<stage>.json`
holding a fresh token; the worker's flow first checks that it reads that file with that token, and
fails with "worker on pool X cannot see artifact root /path ..." when it does not (an unmounted
share, or a local directory of the same name). When the stage is done the worker writes
`<stage>.outcome.json` beside it (the stage's status and artifact path), which the driver reads.
A flow run that ends in any state but Completed fails the stage in the run record with a message
naming the stage, the pool and the flow run.

Placement needs a Prefect server: Prefect's ephemeral mode has no workers.
"""
from __future__ import annotations

import json
import secrets
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from artifacts import ArtifactError, RunStore, code_version
from artifacts.runs import now_iso
from artifacts.store import atomic_write_text
from pipeline.config import ConfigError, RunSettings
from pipeline.runner import record_failure

PLACED_FLOW = "r1flow_placed_stage"  # the flow name of `pipeline.flows.placed_stage_flow`
POLL_S = 2.0  # how often the driver reads the placed flow run's state


class PlacementError(ConfigError):
    """A placement that cannot work: no Prefect server, an unknown pool, a worker that cannot see
    the artifact root or runs other code than the driver."""


class RemoteStageFailed(ArtifactError):
    """A placed stage's flow run ended in a state other than Completed."""


def deployment_name(pool: str) -> str:
    """`flow/deployment` of the placed-stage deployment on `pool`."""
    return f"{PLACED_FLOW}/{pool}"


def require_server() -> str:
    """The Prefect API URL, or PlacementError when none is configured (the ephemeral mode)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PlacementError(
            "run.work_pools needs a Prefect server (Prefect's ephemeral mode has no workers): run "
            "`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api` (the server's "
            "address, reachable from every worker host) and start a worker per pool with "
            "`prefect worker start --pool NAME`")
    return url


def check_pools(run: RunSettings, warn: Callable[[str], None] | None = None) -> None:
    """Fail early when `run.work_pools` cannot work: no server, or a pool the server does not have.
    A pool without an online worker is only a warning: its stages wait until one starts."""
    if not run.work_pools:
        return
    url = require_server()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    with get_client(sync_client=True) as client:
        for pool in sorted(set(run.work_pools.values())):
            stages = ", ".join(s for s, p in run.work_pools.items() if p == pool)
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                raise PlacementError(
                    f"run.work_pools: work pool {pool!r} (for {stages}) does not exist on the Prefect server at "
                    f"{url}; create it with `prefect work-pool create {pool} --type process` and start a worker "
                    f"on a host that mounts the artifact root: `prefect worker start --pool {pool}`") from None
            if not any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool)):
                warn(f"r1flow: no worker is online on work pool {pool!r}; {stages} will wait until one starts "
                     f"(`prefect worker start --pool {pool}` on a host that mounts the artifact root)")


def register_deployment(pool: str) -> None:
    """Create or update the deployment `r1flow_placed_stage/<pool>` on the server."""
    from prefect.deployments.runner import EntrypointType

    from pipeline.flows import placed_stage_flow

    placed_stage_flow.to_deployment(
        name=pool,
        work_pool_name=pool,
        tags=["r1flow", f"pool:{pool}"],
        description=f"one r1flow stage of a run, on work pool {pool} (run.work_pools)",
        entrypoint_type=EntrypointType.MODULE_PATH,
    ).apply()


def _placed_dir(root: Path, run_id: str) -> Path:
    return RunStore(root).path(run_id).parent / "placed"


def write_request(root: Path, run_id: str, stage: str, pool: str) -> str:
    """Write the marker a worker must read back (`check_worker_view`); return its fresh token."""
    token = secrets.token_hex(16)
    folder = _placed_dir(root, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.outcome.json").unlink(missing_ok=True)
    atomic_write_text(folder / f"{stage}.json", json.dumps(
        {"token": token, "stage": stage, "pool": pool, "driver": socket.gethostname(), "created": now_iso()},
        indent=2))
    return token


def check_worker_view(root: Path, run_id: str, stage: str, pool: str, token: str) -> None:
    """On the worker: it sees the driver's artifact root (the marker with this token), or a clear
    PlacementError saying it does not."""
    where = f"worker on pool {pool!r} (host {socket.gethostname()}) cannot see artifact root {root}"
    fix = ("mount the shared artifact root at the same path on the driver and on every worker host "
           "(run.work_pools needs one filesystem, e.g. NFS)")
    marker = _placed_dir(root, run_id) / f"{stage}.json"
    if not Path(root).is_dir():
        raise PlacementError(f"{where}: no such directory on this host; {fix}")
    try:
        seen = json.loads(marker.read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        raise PlacementError(f"{where}: it has no run {run_id!r} (missing {marker}, written by the driver); {fix}") \
            from None
    if seen != token:
        raise PlacementError(f"{where}: {marker} is not the one the driver just wrote (another copy of the root?); "
                             f"{fix}")


def check_code(pool: str, driver_code: str) -> None:
    """On the worker: its r1flow code is the driver's (the code version is part of every cache key)."""
    mine = code_version()
    if mine != driver_code:
        raise PlacementError(
            f"worker on pool {pool!r} (host {socket.gethostname()}) runs r1flow code version {mine[:16]}, the "
            f"driver {driver_code[:16]}: install the same r1flow source on every worker host (or set the same "
            "R1FLOW_CODE_VERSION on both)")


def write_outcome(root: Path, run_id: str, stage: str, token: str, result: dict[str, Any]) -> None:
    """On the worker: the finished stage's result, for the driver."""
    atomic_write_text(_placed_dir(root, run_id) / f"{stage}.outcome.json",
                      json.dumps({"token": token, "result": result}, indent=2))


def stage_result(flow_run: Any, stage: str, pool: str, root: Path, run_id: str, token: str) -> dict[str, Any]:
    """Map a placed stage's finished flow run onto the stage's outcome.

    Completed: the result the worker wrote (status, artifact path, seconds). Any other final state
    (Failed, Crashed, Cancelled, ...): the stage and the run are marked failed in the run record and
    RemoteStageFailed names the stage, the pool, the flow run and the state's message.
    """
    state = flow_run.state
    label = f"flow run {flow_run.name!r} ({flow_run.id})"
    if state is not None and state.is_completed():
        path = _placed_dir(root, run_id) / f"{stage}.outcome.json"
        try:
            outcome = json.loads(path.read_text())
        except (OSError, ValueError):
            outcome = {}
        if outcome.get("token") == token:
            return outcome["result"]
        error = RemoteStageFailed(f"stage {stage} on work pool {pool!r}: {label} completed but left no outcome at "
                                  f"{path}; is the artifact root shared?")
    else:
        kind = state.name if state is not None else "no state"
        message = (state.message or "").strip() if state is not None else ""
        error = RemoteStageFailed(f"stage {stage} failed on work pool {pool!r}: {label} ended {kind}"
                                  + (f": {message}" if message else "") + " (its logs are in the Prefect UI)")
    record_failure(RunStore(root), run_id, stage, error)
    raise error


def run_placed_stage(name: str, pool: str, run_id: str, root: str, force: bool = False,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage of a run on a work pool and wait for it; its result dict as a local stage's."""
    from prefect.deployments import run_deployment

    require_server()
    root_path = Path(root).absolute()
    register_deployment(pool)
    token = write_request(root_path, run_id, name, pool)
    log(f"{name}: placed on work pool {pool} ({deployment_name(pool)}); waiting for its worker")
    flow_run = run_deployment(
        name=deployment_name(pool),
        parameters={"name": name, "run_id": run_id, "root": str(root_path), "pool": pool, "token": token,
                    "code": code_version(), "force": force},
        flow_run_name=f"{run_id}-{name}",
        tags=["r1flow", f"pool:{pool}"],
        timeout=None,
        poll_interval=POLL_S,
    )
    result = stage_result(flow_run, name, pool, root_path, run_id, token)
    log(f"{name}: {result['status']} on work pool {pool} (flow run {flow_run.name}) -> {result['path']}")
    return result
