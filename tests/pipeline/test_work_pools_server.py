"""`run.work_pools` end to end: a real Prefect server, a `process` work pool and its worker.

Starts `prefect server start` (SQLite in a temp dir), creates a process pool with
`prefect work-pool create`, starts `prefect worker start --pool` (PYTHONPATH = this checkout), then
runs the micro flow with `rl_zero` placed on the pool (`r1flow run --set run.work_pools.rl_zero=...`).
Checks that rl_zero ran in the worker's flow run (read back from the Prefect API, a child of the
driver's flow run), and that the run record and the artifacts equal those of a run of the same config
with every stage in the flow's own process. Last, a flow run of the deployment given a root the worker
cannot see fails with the error that says so, and failing the stage from it lands in the run record.
Every subprocess is stopped whatever happens.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from artifacts import RunStore, verify
from pipeline import pools
from pipeline.config import STAGES
from tests.pipeline.prefect_server import free_port, server_env, start_server, stop, wait_healthy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
POOL = "gpu-test"


def _r1flow_run(env: dict[str, str], cwd: Path, root: Path, run_id: str, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--preset", "micro", "--root", str(root),
                           "--run-id", run_id, "--json", *extra],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(done.stdout)


def _record_view(root: Path, run_id: str) -> dict[str, tuple]:
    """Per stage: cache key, content hash and artifact path under the root, as the run record has them."""
    record = RunStore(root).load(run_id)
    return {name: (e.cache_key, e.content_hash, str(Path(e.path).relative_to(root.absolute())))
            for name, e in record.stages.items()}


CLOCK = re.compile(r"(_per_s|_time|_s|seconds)$")  # wall-clock measurements: step_time, median_step_s, ...


def _computed_view(root: Path, run_id: str) -> dict[str, dict]:
    """What two computations of a run must share: per stage every artifact file's sha256 (the
    manifest's), except `metrics.parquet`, compared by its rows minus wall-clock metrics, and the
    summary minus wall-clock entries. (Those timings also reach the content hashes, hence every
    downstream cache key: two independent runs never share those.)"""
    view = {}
    for name, entry in RunStore(root).load(run_id).stages.items():
        manifest = verify(entry.path)
        files = {f: h for f, h in manifest.file_hashes.items() if not f.endswith("metrics.parquet")}
        metrics = [r for f in manifest.file_hashes if f.endswith("metrics.parquet")
                   for r in pq.read_table(Path(entry.path) / f).to_pylist() if not CLOCK.search(r["name"])]
        summary = {k: v for k, v in manifest.summary.items() if not CLOCK.search(k)}
        view[name] = {"files": files, "metrics": metrics, "summary": summary, "rows": manifest.rows,
                      "config": manifest.config, "status": entry.status}
    return view


def test_rl_zero_runs_on_a_process_work_pool(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter, FlowRunFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = server_env(tmp_path / "prefect-home", api)
    env.update(PYTHONPATH=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2")
    server = start_server(port, env)
    worker = None
    worker_log = tmp_path / "worker.log"
    try:
        wait_healthy(api, server, timeout=180)
        created = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"],
                                 env=env, capture_output=True, text=True, timeout=180)
        assert created.returncode == 0, created.stdout + created.stderr
        (tmp_path / "worker-cwd").mkdir()
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                                  env=env, cwd=tmp_path / "worker-cwd", stdout=worker_log.open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        timings["server, pool and worker up"] = time.perf_counter() - t0

        shared, local = tmp_path / "shared-root", tmp_path / "local-root"
        t = time.perf_counter()
        placed = _r1flow_run(env, tmp_path, shared, "micro", "--set", f"run.work_pools.rl_zero={POOL}")
        timings["micro run, rl_zero on the pool"] = time.perf_counter() - t
        assert placed["status"] == "succeeded", placed
        assert {n: s["status"] for n, s in placed["stages"].items()} == {n: "ran" for n in STAGES}
        t = time.perf_counter()
        again = _r1flow_run(env, tmp_path, shared, "micro-local")  # same config, every stage here
        timings["same run, no work_pools, same root (cached)"] = time.perf_counter() - t
        t = time.perf_counter()
        reference = _r1flow_run(env, tmp_path, local, "micro")  # same config, every stage here
        timings["same run, no work_pools, fresh root"] = time.perf_counter() - t
        assert reference["status"] == "succeeded", reference

        # rl_zero ran in the worker's flow run of the pool's deployment, a child of the driver's flow run
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(pools.deployment_name(POOL))
            assert deployment.work_pool_name == POOL
            remote = client.read_flow_runs(deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}))
            assert len(remote) == 1, [r.name for r in remote]  # only the placed stage, only once
            remote_run = remote[0]
            assert remote_run.state is not None and remote_run.state.is_completed(), remote_run.state
            assert remote_run.parameters["name"] == "rl_zero" and remote_run.name == "micro-rl_zero"
            assert remote_run.work_pool_name == POOL
            drivers = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["micro"])))
            driver = next(r for r in drivers if r.deployment_id is None and r.parameters.get("root") == str(shared))
            assert client.read_task_run(remote_run.parent_task_run_id).flow_run_id == driver.id
        assert f"Flow run '{remote_run.name}'" in worker_log.read_text()  # the worker, not the driver, ran it
        record = RunStore(shared).load("micro")
        worker_pid = record.stages["rl_zero"].owner.rsplit(":", 1)[1]
        assert worker_pid != record.stages["base"].owner.rsplit(":", 1)[1]  # base ran in the driver's process

        # work_pools enters no cache key: the same run without it reuses every artifact, rl_zero's included
        assert {n: s["status"] for n, s in again["stages"].items()} == {n: "cached" for n in STAGES}
        assert _record_view(shared, "micro-local") == _record_view(shared, "micro")
        # and rl_zero computed on the pool equals rl_zero computed in the flow's process, byte for byte
        # (wall-clock metrics aside), as does every stage downstream of it
        assert _computed_view(shared, "micro") == _computed_view(local, "micro")
        local_record = RunStore(local).load("micro")
        assert record.config["run"].pop("work_pools") == {"rl_zero": POOL}
        assert local_record.config["run"].pop("work_pools") == {}
        assert record.config == local_record.config  # the same config, work_pools aside

        # a worker that cannot see the root: the flow run fails saying so; the stage fails in the record
        t = time.perf_counter()
        unseen = tmp_path / "not-mounted"
        with temporary_settings(updates={PREFECT_API_URL: api}):
            failed = run_deployment(pools.deployment_name(POOL), timeout=None, poll_interval=1, parameters={
                "name": "rl_zero", "run_id": "micro", "root": str(unseen), "pool": POOL, "token": "t",
                "code": env["R1FLOW_CODE_VERSION"]})
        timings["flow run refused for an unseen root"] = time.perf_counter() - t
        assert failed.state is not None and failed.state.is_failed(), failed.state
        assert f"worker on pool '{POOL}'" in failed.state.message
        assert f"cannot see artifact root {unseen}: no such directory on this host" in failed.state.message
        token = pools.write_request(local, "micro", "rl_zero", POOL)
        with pytest.raises(pools.RemoteStageFailed) as e:
            pools.stage_result(failed, "rl_zero", POOL, local, "micro", token)
        assert f"stage rl_zero failed on work pool '{POOL}': flow run '{failed.name}' ({failed.id}) ended Failed" \
               in str(e.value)
        entry = RunStore(local).load("micro").stages["rl_zero"]
        assert entry.status == "failed" and "cannot see artifact root" in entry.error
    finally:
        if worker is not None:
            stop(worker)  # before the server: a worker whose server is gone retries for a while
        stop(server)
        timings["total"] = time.perf_counter() - t0
        print("\nwork-pool test timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
