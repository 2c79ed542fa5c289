"""Prefect flows: the full R1 pipeline, one-stage reruns, and the schedulable distill flow.

Prefect orchestrates; it does not cache. Each stage is a Prefect task that calls
`pipeline.runner.execute_stage`, whose cache is the artifact store keyed by
hash(stage, config, input content hashes, code version) (DESIGN.md). Prefect's own result cache is
switched off (`NO_CACHE`) on purpose: a cached Prefect result would hand back the path of an
artifact that may since have been deleted or corrupted, and its default policy hashes inputs by
path rather than content. The task run is named `<stage>-<cache key prefix>`, so the UI shows
which artifact a task produced or reused, and a reused one ends in a `Cached` state.

Tasks pass run ids and paths, never tensors or tables. Against a Prefect server, model stages take
a global concurrency slot named `r1flow-device-<device>` (limit 1, created on the server the first
time a model stage runs there on that device: `r1flow-device-cpu` on a CPU host) so that two flows
never train on one device at once; raise the limit afterwards with
`prefect gcl update r1flow-device-<device> --limit N`. Flow runs are named by the r1flow run id and
tagged `preset:<name>`; UI artifacts are keyed per run (`<run>-<stage>-summary`).

A stage the run places on a Prefect work pool (`run.work_pools`) runs as a flow run of the
deployment `r1flow_placed_stage/<pool>` (`placed_stage_flow`, executed by that pool's worker), the
flow waiting on it; `pipeline/pools.py` holds the rest (registration, the shared-root handshake).
"""
from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from artifacts import ArtifactError, RunStore, read_manifest
from lm.train import resolve_device
from pipeline.config import STAGES, ConfigError, RunConfig, validate
from pipeline.runner import drive_run, execute_stage, finish_run, run_owner_lock, update_run_config

DEVICE_FREE_STAGES = {"problems"}
DEVICE_LEASE_S = 60.0  # the server's minimum
_TRANSIENT = (OSError, TimeoutError, ConnectionError)


def _retry_transient(task, task_run, state) -> bool:
    """Retry only failures a retry can fix (I/O, timeouts), not bad config or bad data."""
    try:
        state.result()
    except (ConfigError, ArtifactError, FileNotFoundError, PermissionError):
        return False
    except _TRANSIENT:
        return True
    except BaseException:
        return False
    return False


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # called outside a flow run (unit tests of helpers)
        return logging.getLogger("r1flow")


def config_of(run_id: str, root: Path) -> RunConfig:
    record = RunStore(root).load(run_id)
    return validate(record.config, preset=record.preset)


def server_configured() -> bool:
    """True when flows report to a Prefect server (PREFECT_API_URL), not the ephemeral API."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextmanager
def device_slot(device: str) -> Iterator[None]:
    """Hold the device's global concurrency slot (limit 1) for the duration of a model stage.

    Only against a Prefect server: its lease-expiry service frees the slot of a killed holder
    after `DEVICE_LEASE_S`. Prefect's ephemeral API runs no such service, so a killed local run
    would block the device for good; a local run is one process and needs no slot.
    """
    if not server_configured():
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"r1flow-device-{device.replace(':', '-')}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass
    # The holder renews its lease while it lives; a short lease frees the slot of a killed run
    # within seconds instead of Prefect's default five minutes.
    with concurrency(name, occupy=1, strict=True, lease_duration=DEVICE_LEASE_S):
        yield


def _progress(iterable: Iterable[Any], desc: str = "", total: int | None = None) -> Iterator[Any]:
    """A `ctx.progress` for orchestrated stages: a tqdm bar on a terminal only (`disable=None`), and
    log lines written while it is shown go above it (`logging_redirect_tqdm`), never glued to it."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger("prefect"), logging.getLogger("r1flow")]):
        yield from tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False, disable=None)


def artifact_key(run_id: str, stage: str, what: str) -> str:
    """A Prefect artifact key scoped to one run (keys allow lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{run_id}-{stage}-{what}".lower()).strip("-")


def publish_ui_artifacts(run_id: str, stage: str, path: Path, status: str) -> None:
    """A table artifact (summary + dataset preview; for evaluate, the checkpoint × metric table)
    and a markdown artifact (the manifest in words), keyed per run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipeline.inspect import inspect_dataset, resolve
    from pipeline.report import eval_rows

    m = read_manifest(path)
    rows = [{"metric": k, "value": v} for k, v in m.summary.items()]
    if stage == "evaluate":
        rows = eval_rows(path)
    elif m.rows:
        preview = inspect_dataset(resolve(str(path)), rows=10)["head"]
        rows += [{"metric": f"preview[{i}]", "value": json.dumps(r, default=str)[:300]} for i, r in enumerate(preview)]
    create_table_artifact(rows, key=artifact_key(run_id, stage, "summary"), description=f"{stage} of run {run_id}")
    lines = [
        f"### {stage} — {status}",
        f"- artifact `{m.id}` at `{path}`",
        f"- created {m.created}, code {m.code_version}",
        f"- inputs: " + (", ".join(f"{k} `{v[:12]}`" for k, v in m.inputs.items()) or "none"),
        f"- datasets: " + (", ".join(f"{k} ({v:,} rows)" for k, v in m.rows.items()) or "none"),
        "- summary: " + ", ".join(f"{k}={v}" for k, v in m.summary.items()),
    ]
    create_markdown_artifact("\n".join(lines), key=artifact_key(run_id, stage, "manifest"),
                             description=f"{stage} manifest, run {run_id}")


@task(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_transient,
      task_run_name="{name}")
def stage_task(name: str, run_id: str, root: str, force: bool = False, reuse_only: bool = False) -> dict[str, Any]:
    """Run (or reuse) one stage of a run; returns its status and artifact path."""
    logger = _logger()
    root_path = Path(root)
    cfg = config_of(run_id, root_path)
    slot = nullcontext() if name in DEVICE_FREE_STAGES or reuse_only else device_slot(resolve_device(cfg.run.device))
    with slot:
        outcome = execute_stage(name, cfg, run_id, root_path, force=force, log=logger.info, progress=_progress,
                                reuse_only=reuse_only)
    try:
        publish_ui_artifacts(run_id, name, outcome.path, outcome.status)
    except Exception as e:  # the UI preview must never fail a finished stage
        logger.warning(f"{name}: could not publish UI artifacts: {e}")
    result = {"stage": name, "status": outcome.status, "path": str(outcome.path), "seconds": outcome.seconds}
    if outcome.status == "cached":  # shown as `Cached` in the UI, not as a computed `Completed`
        return Completed(name="Cached", data=result, message=f"reused {Path(outcome.path).name}")
    return result


def run_stage(name: str, run_id: str, root: str, **options: Any) -> dict[str, Any]:
    """One stage inside a flow: its result dict (a failed stage raises its exception).

    A stage the run places on a work pool (`run.work_pools`) runs as a flow run of that pool's
    deployment, this flow waiting on it (`pipeline.pools`); the others, and stages that are only
    reused (`reuse_only`, before `run --from`: nothing to compute), run here as `stage_task`.
    """
    pool = config_of(run_id, Path(root)).run.work_pools.get(name)
    if pool is not None and not options.get("reuse_only"):
        from pipeline.pools import run_placed_stage

        return run_placed_stage(name, pool, run_id, root, force=bool(options.get("force")), log=_logger().info)
    return _run_here(name, run_id, root, **options)


def _run_here(name: str, run_id: str, root: str, **options: Any) -> dict[str, Any]:
    """`stage_task` in this process: its result dict (a failed stage raises its exception)."""
    return stage_task(name, run_id, root, return_state=True, **options).result()


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="report")
def report_task(run_id: str, root: str) -> str:
    """Write the run's report (`r1flow report`) and publish it, plots inline, as a markdown artifact
    keyed `<run>-report`; a report that cannot be drawn is a warning, never a failed run."""
    from prefect.artifacts import create_markdown_artifact

    from pipeline.report import write_report

    try:
        path = write_report(Path(root), run_id)
    except Exception as e:
        _logger().warning(f"report: could not be written: {e}")
        return ""
    create_markdown_artifact(inline_images(path), key=artifact_key(run_id, "run", "report"),
                             description=f"report of run {run_id} ({path})")
    return str(path)


def inline_images(report: Path, max_bytes: int = 2_000_000) -> str:
    """The report's Markdown with its PNGs as data URIs (the UI cannot read local files); images
    past `max_bytes` in all stay as their absolute paths."""
    import base64

    text, budget = report.read_text(), max_bytes
    for png in sorted(report.parent.glob("*.png")):
        data = png.read_bytes()
        target = str(png.resolve())
        if len(data) <= budget:
            budget -= len(data)
            target = "data:image/png;base64," + base64.b64encode(data).decode()
        text = text.replace(f"]({png.name})", f"]({target})")
    return text + f"\n\nFiles: `{report.parent.resolve()}`\n"


@flow(name="r1_pipeline", flow_run_name="{run_id}", log_prints=True)
def r1_pipeline(run_id: str, root: str, stages: list[str] | None = None, force: list[str] | None = None,
                reuse_only: list[str] | None = None) -> list[dict]:
    """Every stage of the R1 recipe in order (or the listed ones), each reused when cached; the
    `reuse_only` ones (before `run --from`) are taken from the cache or fail, never computed."""
    return drive_run(Path(root), run_id, config_of(run_id, Path(root)).run, stages or list(STAGES),
                     lambda name: run_stage(name, run_id, root, force=name in (force or []),
                                            reuse_only=name in (reuse_only or [])),
                     lambda: report_task(run_id, root))


@flow(name="r1flow_stage", flow_run_name="{run_id}-{name}", log_prints=True)
def stage_flow(name: str, run_id: str, root: str, force: bool = False) -> dict:
    """Rerun one stage of an existing run, reusing its upstream artifacts."""
    with run_owner_lock(Path(root), run_id, config_of(run_id, Path(root)).run):
        result = run_stage(name, run_id, root, force=force)
        if RunStore(Path(root)).load(run_id).status == "stale":
            finish_run(Path(root), run_id, "succeeded")  # stays "stale" while any stage is
    return result


@flow(name="r1flow_placed_stage", flow_run_name="{run_id}-{name}", log_prints=True)
def placed_stage_flow(name: str, run_id: str, root: str, pool: str, token: str, code: str,
                      force: bool = False) -> dict:
    """One stage of a run, executed by a worker of the work pool the run places it on.

    The flow that placed it holds the run's lock and waits (`pipeline.pools.run_placed_stage`), so
    this one takes no lock. It first checks that this host sees the driver's artifact root (the
    marker holding `token`) and runs the driver's code version, then runs the stage as a local one
    (cache, device slot, run record), and leaves its result beside the marker for the driver.
    """
    from pipeline import pools

    pools.check_worker_view(Path(root), run_id, name, pool, token)
    pools.check_code(pool, code)
    result = _run_here(name, run_id, root, force=force)
    pools.write_outcome(Path(root), run_id, name, token, result)
    return result


def merged_students(existing: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The run's students so far, then the named presets it does not have yet: a scheduled distill
    adds students to the teacher's run, it never drops earlier ones."""
    have = {s["name"] for s in existing}
    return [*existing, *({"name": n, "model": n} for n in dict.fromkeys(names) if n not in have)]


@flow(name="distill", flow_run_name="distill-{teacher_run}", log_prints=True)
def distill_flow(teacher_run: str, students: list[str], root: str, overrides: list[str] | None = None) -> dict:
    """Distill the teacher run's rejection-sampled data into the given students.

    The students' artifacts are written into the teacher's run (its `distill` stage), so
    `r1flow inspect TEACHER/distill` and `r1flow runs` show them; `evaluate` becomes stale.
    """
    with RunStore(root).lock(teacher_run):  # distill jobs run on node 0 only
        existing = RunStore(Path(root)).load(teacher_run).config.get("distill", {}).get("students", [])
        student_specs = merged_students(existing, students)
        update_run_config(Path(root), teacher_run, [f"distill.students={json.dumps(student_specs)}", *(overrides or [])])
        return run_stage("distill", teacher_run, root)
