"""Execute stages against the artifact store and a run record; Prefect wraps these functions.

This module holds everything "run a stage" means apart from orchestration: resolve and verify the
upstream artifacts, compute the cache key (with the device and dtype `lm.train` resolves, the
ones the stage runs with), reuse or produce the artifact atomically (a corrupt cached artifact is
recomputed), give the stage a scratch directory that survives a crash (so it can resume), record
the outcome (a failure with its message) and mark downstream stages stale when an artifact
changed. `pipeline/flows.py` calls `execute_stage` from Prefect tasks; `tests/pipeline/test_runner.py`
calls it directly.
"""
from __future__ import annotations

import shutil
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from artifacts import Artifact, ArtifactError, ArtifactStore, RunRecord, RunStore, StageEntry, cache_key, code_version, verify
from artifacts.runs import now_iso, process_owner
from lm.train import resolve_device, resolve_dtype_name
from pipeline import launch
from pipeline.config import (SERVER_SAMPLING_STAGES, STAGES, RunConfig, apply_overrides, stage_module, stage_sampler,
                             validate)
from pipeline.trackers import open_trackers
from stages.context import StageContext


@dataclass
class StageOutcome:
    name: str
    status: str  # ran | cached
    path: Path
    seconds: float
    summary: dict


class UpstreamMissing(ArtifactError):
    """A stage's input artifact is absent or corrupt; named, never recomputed silently."""


class NotCached(ArtifactError):
    """A stage that may only be reused (before `run --from`) has no artifact in the cache."""


class StageError(ArtifactError):
    """A stage rejected its input or diverged: a message for the user, not a traceback."""


# What stages raise for bad input (a missing column, an unreadable user file) or divergence
# (NonFiniteError is a FloatingPointError); anything else is a bug and keeps its traceback.
_USER_FACING = (ValueError, FileNotFoundError, FloatingPointError)


def stage_key(name: str, cfg: RunConfig, input_hashes: dict[str, str]) -> tuple[str, dict]:
    """The artifact cache key of a stage in a run, and the config payload it hashes.

    A stage that reads files outside the artifact store (the user's problem files, user reward
    code) names them in `external_inputs(cfg) -> {name: sha256}`; those hashes join the payload,
    so editing such a file reruns the stage.

    A sampling-only stage whose generation goes to a server (`run.sampler.backend = "openai"`)
    adds the server's model name and the settings that change its answers
    (`SamplerSettings.cache_payload`); with the torch backend nothing is added, so its keys are
    the keys of before that option existed.
    """
    payload = {
        "stage": cfg.stage(name).model_dump(mode="json"),
        # Seed and dtype change the bytes a stage produces; the device does not (by intent).
        "seed": cfg.run.seed,
        "dtype": resolve_dtype_name(cfg.run.dtype, resolve_device(cfg.run.device)),
    }
    external = getattr(stage_module(name), "external_inputs", None)
    files = external(cfg.stage(name)) if external is not None else {}
    if files:
        payload["external"] = files
    samples = name in SERVER_SAMPLING_STAGES and getattr(cfg.stage(name), "source", None) != "file"
    sampler = cfg.run.sampler.cache_payload() if samples else None  # cold_start from a file samples nothing
    if sampler is not None:
        payload["sampler"] = sampler
    return cache_key(name, payload, input_hashes, code_version()), payload


def upstream_inputs(name: str, record: RunRecord) -> tuple[dict[str, Path], dict[str, str]]:
    """Paths and content hashes of a stage's inputs, verified; UpstreamMissing names the culprit."""
    paths, hashes = {}, {}
    for up in stage_module(name).INPUTS:
        entry = record.stages.get(up)
        if entry is None or not entry.path:
            status = entry.status if entry else "absent"
            raise UpstreamMissing(
                f"stage {name} needs the {up} artifact, but run {record.run_id} has none ({up} is {status}); "
                f"run `r1flow stage {up} --run {record.run_id}` first"
            )
        try:
            manifest = verify(entry.path)
        except ArtifactError as e:
            raise UpstreamMissing(f"stage {name}: upstream {up} artifact is unusable: {e}") from e
        paths[up] = Path(entry.path)
        hashes[up] = manifest.content_hash
    return paths, hashes


SINGLE_PROCESS_STAGES = {"problems"}  # no model: never worth several processes


def run_owner_lock(root: Path, run_id: str, run: Any) -> ContextManager[None]:
    """The run's lock (`RunStore.lock`) for the process that owns the run; nothing on hosts other
    than node 0 of a multi-host stage, which only compute (node 0 records and publishes)."""
    if run.node_rank != 0 and launch.world_size(run) > 1:
        return nullcontext()
    return RunStore(root).lock(run_id)


def _producer(name: str, cfg: RunConfig, inputs: dict[str, Path], ctx: StageContext,
              scratch: Path) -> Callable[[Path], dict]:
    """What fills the artifact's temporary directory: the stage function in this process, or, when
    the run asks for several processes, the same function on every rank under torchrun
    (`pipeline.launch`: rank 0 writes, a failed rank is named)."""
    module = stage_module(name)
    if launch.world_size(cfg.run) == 1 or name in SINGLE_PROCESS_STAGES:
        return lambda out: module.run(cfg.stage(name), inputs, out, ctx)
    return lambda out: launch.launch_stage(name, cfg.to_dict(), cfg.preset, inputs, out, scratch, run=cfg.run,
                                           seed=ctx.seed, device=ctx.device, dtype=ctx.dtype, log=ctx.log)


def execute_stage(
    name: str,
    cfg: RunConfig,
    run_id: str,
    root: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress=None,
    reuse_only: bool = False,
) -> StageOutcome:
    """Reuse or produce one stage's artifact for a run, and record it in the run record.

    `reuse_only` (the stages before `r1flow run --from X`): take the artifact from the cache or fail
    with `NotCached`; never compute it.
    """
    runs, store = RunStore(root), ArtifactStore(root)
    record = runs.load(run_id)
    inputs, hashes = upstream_inputs(name, record)
    key, payload = stage_key(name, cfg, hashes)
    entry = record.stages.setdefault(name, StageEntry())
    previous_hash = entry.content_hash

    if cfg.run.node_rank != 0 and launch.world_size(cfg.run) > 1 and name not in SINGLE_PROCESS_STAGES:
        return _participate(name, cfg, inputs, root / "work" / name / key[:24], log)
    # One process builds a stage key at a time; a second one waits here, then takes the cache hit.
    with store.lock(name, key, on_wait=log):
        found = None if force else store.find(name, key)
        if found is not None:
            try:
                verify(found.path)
            except ArtifactError as e:
                log(f"{name}: cached artifact is corrupt ({e}); recomputing")
                found = None
        if found is not None:
            status, seconds = "cached", 0.0
            log(f"{name}: reused from cache ({found.manifest.id})")
        elif reuse_only:
            error = NotCached(f"stage {name} has no cached artifact for this config (key {key[:12]}), and stages "
                              f"before --from are only reused, never computed: start earlier (--from {name}) "
                              "or drop --from")
            record_failure(runs, run_id, name, error)
            raise error
        else:
            found, seconds = _produce(name, cfg, key, payload, inputs, hashes, run_id, root, log, progress)
            status = "ran"

    record = runs.load(run_id)  # re-read: the stage may have run for a long time
    entry = record.stages[name]
    if status == "cached" and entry.content_hash == found.manifest.content_hash and entry.status in ("ran", "cached") \
            and entry.path is not None and Path(entry.path) == Path(found.path).absolute():
        return StageOutcome(name, status, found.path, seconds, found.manifest.summary)  # the record already says so
    entry.status, entry.path = status, str(found.path)
    entry.cache_key, entry.content_hash = key, found.manifest.content_hash
    entry.finished, entry.seconds, entry.summary = now_iso(), round(seconds, 2), found.manifest.summary
    entry.work = None
    if previous_hash is not None and previous_hash != found.manifest.content_hash:
        stale = record.mark_stale_after(name, STAGES)
        if stale:
            record.status = "stale"
            log(f"{name}: new artifact; downstream stages now stale: {', '.join(stale)} "
                f"(`r1flow stage {name} --run {run_id} --downstream` recomputes them)")
    runs.save(record)
    return StageOutcome(name, status, found.path, seconds, found.manifest.summary)


def _produce(name: str, cfg: RunConfig, key: str, payload: dict, inputs: dict[str, Path], hashes: dict[str, str],
             run_id: str, root: Path, log: Callable[[str], None], progress) -> tuple[Artifact, float]:
    """Run the stage into a new artifact (the caller holds the key's lock); record a failure."""
    runs, store = RunStore(root), ArtifactStore(root)
    record = runs.load(run_id)
    entry = record.stages[name]
    scratch = root / "work" / name / key[:24]  # survives a crash: the stage resumes from here
    scratch.mkdir(parents=True, exist_ok=True)
    entry.status, entry.started, entry.error, entry.owner = "running", now_iso(), None, process_owner()
    entry.work = str(scratch)  # where `inspect RUN/STAGE/metrics` finds the rows so far
    runs.save(record)
    device = resolve_device(cfg.run.device)
    tracker = open_trackers(cfg.run.trackers, runs.path(run_id).parent / "tensorboard" / name)
    ctx = StageContext(seed=cfg.run.seed, device=device, dtype=resolve_dtype_name(cfg.run.dtype, device),
                       run_dir=scratch, log=log, track=tracker.track, shard=cfg.run.shard,
                       sampler=stage_sampler(cfg.run, name))
    if progress is not None:
        ctx.progress = progress
    module = stage_module(name)
    t0 = time.perf_counter()
    log(f"{name}: running (key {key[:12]})")
    try:
        published = store.publish(name, key, payload, hashes, _producer(name, cfg, inputs, ctx, scratch),
                                  module.SCHEMAS)
    except BaseException as e:
        tracker.close()
        record_failure(runs, run_id, name, e)
        if isinstance(e, _USER_FACING):
            raise StageError(f"stage {name} failed: {e}") from e
        raise
    tracker.close()
    seconds = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    log(f"{name}: done in {seconds:.1f}s ({published.manifest.id})")
    return published, seconds


def record_failure(runs: RunStore, run_id: str, name: str, error: BaseException) -> None:
    """Mark the stage (and the run) failed in the record, with the error's one-line message."""
    record = runs.load(run_id)
    record.stages[name].status = "failed"
    record.stages[name].error = "".join(traceback.format_exception_only(type(error), error)).strip()
    record.status = "failed"
    runs.save(record)


def update_run_config(root: Path, run_id: str, overrides: list[str]) -> None:
    """Apply `--set` overrides to a run's recorded config (validated before anything changes)."""
    runs = RunStore(root)
    record = runs.load(run_id)
    cfg = validate(apply_overrides(record.config, overrides), preset=record.preset)
    record.config = cfg.to_dict()
    runs.save(record)


def _participate(name: str, cfg: RunConfig, inputs: dict[str, Path], scratch: Path,
                 log: Callable[[str], None]) -> StageOutcome:
    """A host other than node 0 of a multi-host stage: compute its ranks' share and publish
    nothing (node 0 writes the artifact and the run record)."""
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"node-{cfg.run.node_rank}-out"
    out.mkdir(exist_ok=True)
    device = resolve_device(cfg.run.device)
    t0 = time.perf_counter()
    try:
        launch.launch_stage(name, cfg.to_dict(), cfg.preset, inputs, out, scratch, run=cfg.run, seed=cfg.run.seed,
                            device=device, dtype=resolve_dtype_name(cfg.run.dtype, device), log=log)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return StageOutcome(name, "participated", out, time.perf_counter() - t0, {})


def all_cached(cfg: RunConfig, stages: list[str], root: Path) -> bool:
    """True when every one of `stages` (in order, each one's inputs among the earlier ones) has an
    artifact in the cache for this config: the keys are followed from the cache's own artifacts,
    without touching any run record. A corrupt artifact is found later by `execute_stage`."""
    store = ArtifactStore(root)
    hashes: dict[str, str] = {}
    for name in stages:
        inputs = stage_module(name).INPUTS
        if any(up not in hashes for up in inputs):
            return False
        key, _ = stage_key(name, cfg, {up: hashes[up] for up in inputs})
        found = store.find(name, key)
        if found is None:
            return False
        hashes[name] = found.manifest.content_hash
    return True


def drive_run(root: Path, run_id: str, run: Any, stages: list[str], run_one: Callable[[str], Any],
              report: Callable[[], Any]) -> list[Any]:
    """Run `stages` in order under the run's lock with `run_one(name)`, then `report()` after a full
    run, and record how the run ended: the body of the `r1_pipeline` flow and of `record_cached_run`."""
    results = []
    with run_owner_lock(root, run_id, run):  # no `stage` swaps one out from under it
        try:
            for name in stages:
                results.append(run_one(name))
            if stages and stages[-1] == STAGES[-1]:
                report()
        except BaseException:
            finish_run(root, run_id, "failed")
            raise
        finish_run(root, run_id, "succeeded")
    return results


def record_cached_run(cfg: RunConfig, run_id: str, root: Path, stages: list[str],
                      log: Callable[[str], None]) -> None:
    """Take every stage of a run from the cache and record it, in this process and without
    Prefect: what `r1_pipeline` does when nothing is left to compute (the caller checked
    `all_cached`), minus the orchestration. Writes the report (its plots reused) after a full run."""
    from pipeline.report import write_report

    def report() -> None:
        try:
            log(f"report: {write_report(root, run_id)}")
        except Exception as e:  # as in the flow: a report that cannot be drawn is a warning
            log(f"report: could not be written: {e}")

    drive_run(root, run_id, cfg.run, stages, lambda name: execute_stage(name, cfg, run_id, root, log=log,
                                                                        reuse_only=True), report)


def finish_run(root: Path, run_id: str, status: str) -> RunRecord:
    """Record how a flow ended; a "succeeded" run that still has stale stages reads "stale", one
    with stages never run (`run --until`) reads "partial"."""
    runs = RunStore(root)
    record = runs.load(run_id)
    if status == "succeeded" and any(e.status == "stale" for e in record.stages.values()):
        status = "stale"
    elif status == "succeeded" and any(e.status == "pending" for e in record.stages.values()):
        status = "partial"
    record.status = status
    runs.save(record)
    return record
