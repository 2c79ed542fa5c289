"""Placing stages on Prefect work pools (`run.work_pools`, pipeline/pools.py): the config, the
early errors, the worker's checks and the mapping of a placed flow run's final state.

The end-to-end run on a real server with a real worker is `test_work_pools_server.py` (slow).
"""
from __future__ import annotations

import json
from uuid import uuid4

import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled, Completed, Crashed, Failed

from artifacts import RunStore
from pipeline import pools
from pipeline.config import STAGES, ConfigError, RunSettings, load_config, stage_module
# Imported here, not in a test: `from prefect import flow` sets Prefect's logging up on the stderr
# of the moment, which under `capsys` is a stream closed after that test.
from pipeline.flows import placed_stage_flow, run_stage
from pipeline.runner import stage_key
from tests.pipeline.cli_helpers import cli


def test_work_pools_config_takes_known_stages():
    cfg = load_config("micro", overrides=["run.work_pools.rl_zero=gpu", "run.work_pools.distill=gpu-small"])
    assert cfg.run.work_pools == {"rl_zero": "gpu", "distill": "gpu-small"}
    assert load_config("micro").run.work_pools == {}  # default: every stage in the flow's process


@pytest.mark.parametrize("override, named", [
    ("run.work_pools.rl_zro=gpu", "rl_zro"),          # unknown stage, named
    ('run.work_pools.rl_zero="gpu/a"', "gpu/a"),      # not a deployable pool name
    ("run.work_pools=3", "valid dictionary"),
])
def test_work_pools_config_errors_name_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        load_config("micro", overrides=[override])
    assert "run.work_pools" in str(e.value) and named in str(e.value)


def test_cli_exits_2_on_an_unknown_stage_in_work_pools(tmp_path, capsys):
    code, _ = cli("run", "--preset", "micro", "--root", str(tmp_path), "--set", "run.work_pools.rl_zro=gpu")
    assert code == 2
    err = capsys.readouterr().err
    assert "run.work_pools" in err and "unknown stage(s) ['rl_zro']" in err
    assert not (tmp_path / "runs").exists()


def test_work_pools_do_not_enter_cache_keys():
    local = load_config("micro")
    placed = load_config("micro", overrides=["run.work_pools.rl_zero=gpu", "run.work_pools.distill=gpu-small"])
    for name in STAGES:
        hashes = {up: f"{up}-hash" for up in stage_module(name).INPUTS}
        assert stage_key(name, local, hashes)[0] == stage_key(name, placed, hashes)[0], name


def test_without_a_server_work_pools_fail_before_any_work(tmp_path, capsys):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # Prefect's ephemeral mode
        code, _ = cli("run", "--preset", "micro", "--root", str(tmp_path), "--set", "run.work_pools.rl_zero=gpu")
    assert code == 2
    err = capsys.readouterr().err
    assert "run.work_pools needs a Prefect server" in err
    assert "prefect server start" in err and "PREFECT_API_URL" in err
    assert not (tmp_path / "runs").exists()  # no run recorded, nothing computed


def test_a_placed_stage_without_a_server_fails_in_the_flow_too(tmp_path):
    """`run_stage` (every flow's way to run a stage) sends a placed stage to its pool, which needs the
    server: a Python caller of the flows gets the same error as the CLI."""
    cfg = load_config("micro", overrides=["run.work_pools.base=gpu"])
    RunStore(tmp_path).create(cfg.to_dict(), STAGES, preset="micro", run_id="r")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(pools.PlacementError, match="prefect server start"):
            run_stage("base", "r", str(tmp_path))


@pytest.mark.usefixtures("prefect_harness")
def test_an_unknown_pool_is_named_with_the_command_that_creates_it():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with pytest.raises(pools.PlacementError) as e:
        pools.check_pools(RunSettings(work_pools={"rl_zero": "no-such-pool", "sft": "no-such-pool"}))
    assert "work pool 'no-such-pool' (for rl_zero, sft) does not exist" in str(e.value)
    assert "prefect work-pool create no-such-pool --type process" in str(e.value)

    name = f"idle-{uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    warnings: list[str] = []
    pools.check_pools(RunSettings(work_pools={"rl_zero": name}), warn=warnings.append)
    assert len(warnings) == 1 and f"no worker is online on work pool {name!r}" in warnings[0]


def _run(root, run_id="r1"):
    cfg = load_config("micro", overrides=["run.work_pools.rl_zero=gpu"])
    RunStore(root).create(cfg.to_dict(), STAGES, preset="micro", run_id=run_id)
    return run_id


def test_worker_that_cannot_see_the_root_fails_clearly(tmp_path):
    root = tmp_path / "shared"
    missing = tmp_path / "not-mounted"
    with pytest.raises(pools.PlacementError) as e:
        pools.check_worker_view(missing, "r1", "rl_zero", "gpu", "t")
    assert f"worker on pool 'gpu' (host " in str(e.value)
    assert f"cannot see artifact root {missing}: no such directory" in str(e.value)
    assert "mount the shared artifact root at the same path" in str(e.value)

    root.mkdir()  # a directory of that name, but not the driver's: no run, no marker
    with pytest.raises(pools.PlacementError, match=f"cannot see artifact root {root}: it has no run 'r1'"):
        pools.check_worker_view(root, "r1", "rl_zero", "gpu", "t")

    run_id = _run(root)
    token = pools.write_request(root, run_id, "rl_zero", "gpu")
    pools.check_worker_view(root, run_id, "rl_zero", "gpu", token)  # the driver's root: no error
    with pytest.raises(pools.PlacementError, match="is not the one the driver just wrote"):
        pools.check_worker_view(root, run_id, "rl_zero", "gpu", "an older token")


@pytest.mark.usefixtures("prefect_harness")
def test_placed_stage_flow_checks_the_root_before_any_work(tmp_path):
    run_id = _run(tmp_path)
    with pytest.raises(pools.PlacementError, match="cannot see artifact root"):
        placed_stage_flow(name="rl_zero", run_id=run_id, root=str(tmp_path), pool="gpu", token="not-written",
                          code="tests")
    assert RunStore(tmp_path).load(run_id).stages["rl_zero"].status == "pending"  # nothing ran


def test_worker_with_other_code_is_refused():
    from artifacts import code_version

    pools.check_code("gpu", code_version())
    with pytest.raises(pools.PlacementError) as e:
        pools.check_code("gpu", "driver-code-0123456789")
    assert f"runs r1flow code version {code_version()[:16]}, the driver driver-code-0123:" in str(e.value)


def _flow_run(state) -> FlowRun:
    return FlowRun(name="r1-rl_zero", flow_id=uuid4(), state=state)


@pytest.mark.parametrize("state, shown", [
    (Failed(message="Flow run encountered an exception: StageError: stage rl_zero failed: diverged"),
     "ended Failed: Flow run encountered an exception: StageError: stage rl_zero failed: diverged"),
    (Crashed(message="Flow run infrastructure exited with non-zero status code -9."),
     "ended Crashed: Flow run infrastructure exited with non-zero status code -9."),
    (Cancelled(message=""), "ended Cancelled (its logs"),
])
def test_a_failed_remote_run_fails_the_stage_and_the_record_says_so(tmp_path, state, shown):
    run_id = _run(tmp_path)
    token = pools.write_request(tmp_path, run_id, "rl_zero", "gpu")
    flow_run = _flow_run(state)
    with pytest.raises(pools.RemoteStageFailed) as e:
        pools.stage_result(flow_run, "rl_zero", "gpu", tmp_path, run_id, token)
    message = str(e.value)
    assert message.startswith("stage rl_zero failed on work pool 'gpu': flow run 'r1-rl_zero'")
    assert str(flow_run.id) in message and shown in message
    record = RunStore(tmp_path).load(run_id)
    assert record.status == "failed" and record.stages["rl_zero"].status == "failed"
    assert message in record.stages["rl_zero"].error


def test_a_completed_remote_run_hands_back_the_workers_result(tmp_path):
    run_id = _run(tmp_path)
    token = pools.write_request(tmp_path, run_id, "rl_zero", "gpu")
    # Completed, but the worker wrote no outcome here (another root): a failure, not a silent success
    with pytest.raises(pools.RemoteStageFailed, match="completed but left no outcome"):
        pools.stage_result(_flow_run(Completed()), "rl_zero", "gpu", tmp_path, run_id, token)
    result = {"stage": "rl_zero", "status": "ran", "path": str(tmp_path / "artifacts" / "x"), "seconds": 1.5}
    pools.write_outcome(tmp_path, run_id, "rl_zero", token, result)
    assert pools.stage_result(_flow_run(Completed()), "rl_zero", "gpu", tmp_path, run_id, token) == result
    marker = json.loads((tmp_path / "runs" / run_id / "placed" / "rl_zero.json").read_text())
    assert marker["token"] == token and marker["pool"] == "gpu"
    # a new request drops the previous outcome: an old result is never read as the new one's
    pools.write_request(tmp_path, run_id, "rl_zero", "gpu")
    assert not (tmp_path / "runs" / run_id / "placed" / "rl_zero.outcome.json").exists()
