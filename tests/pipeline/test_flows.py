"""The full flow under Prefect (one session-scoped test harness), on the `micro` preset."""
import json

import pytest

from artifacts import RunStore, verify
from pipeline.config import STAGES
from pipeline.inspect import inspect_dataset, resolve
from tests.pipeline.cli_helpers import cli, cli_json

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_full_flow_on_micro_preset(micro_run):
    root, run_id, summary = micro_run
    assert summary["run_id"] == run_id and summary["status"] == "succeeded"
    assert list(summary["stages"]) == list(STAGES)
    record = RunStore(root).load(run_id)
    for name in STAGES:
        entry = record.stages[name]
        assert entry.status == "ran", (name, entry)
        manifest = verify(entry.path)  # every artifact complete and uncorrupted
        assert manifest.stage == name
        for dataset in manifest.rows:  # every dataset opens with `inspect`
            info = inspect_dataset(resolve(f"{run_id}/{name}/{dataset}", root), rows=2)
            assert info["rows"] == manifest.rows[dataset]
    ev = record.stages["evaluate"].summary
    for ckpt in ("base", "rl_zero", "sft", "rl_reasoning"):
        assert 0.0 <= ev[ckpt]["pass@1"] <= 1.0 and ev[ckpt]["params"] > 0


def test_prefect_ui_names_runs_and_scopes_artifacts(micro_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, ArtifactFilterType, FlowRunFilter,
                                                FlowRunFilterName)

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["micro-1"])))
        assert runs and "preset:micro" in runs[0].tags  # named by the r1flow run id, tagged with its preset
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["micro-1-evaluate-summary"])))
        assert table, "the evaluate table is keyed per run"
        rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
        assert {r["checkpoint"] for r in rows} >= {"base", "rl_zero", "sft", "rl_reasoning"}
        assert not client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
        report = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["micro-1-run-report"])))
        assert report, "the run's report is published at the end of the flow"
        body = report[0].data
        # every plot the report draws is inline, since the UI cannot open local files
        assert body.count("](data:image/png;base64,") == body.count("![") >= 2
        assert "## Evaluation" in body


def test_second_identical_run_reuses_every_stage(micro_run):
    root, _, _ = micro_run
    code, out = cli("run", "--preset", "micro", "--root", str(root), "--run-id", "micro-2", "--json")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert {s["status"] for s in summary["stages"].values()} == {"cached"}
    first = RunStore(root).load("micro-1")
    assert all(summary["stages"][n]["path"] == first.stages[n].path for n in STAGES)
    # the Prefect UI tells a reused stage from a computed one
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        flow_runs = {r.name: r for r in client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["micro-1", "micro-2"])))}
        states = {name: {t.state.name for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id={"any_": [flow_runs[name].id]})) if t.name in STAGES} for name in ("micro-1", "micro-2")}
    assert states == {"micro-1": {"Completed"}, "micro-2": {"Cached"}}  # (the report task is computed in both)


def test_a_fully_cached_run_without_a_server_is_recorded_without_prefect(micro_copy, monkeypatch):
    """Ephemeral mode (no PREFECT_API_URL) and every stage cached: nothing to orchestrate, so no
    temporary server and no flow; the record and report are those of a normal cached rerun."""
    from pipeline import commands, flows, prefect_setup
    from pipeline.config import load_config
    from pipeline.runner import all_cached

    root, _ = micro_copy
    cfg = load_config("micro", None, [])
    assert all_cached(cfg, list(STAGES), root)
    assert not all_cached(load_config("micro", None, ["evaluate.k=3"]), list(STAGES), root)  # evaluate would run
    assert all_cached(load_config("micro", None, ["evaluate.k=3"]), list(STAGES[:-1]), root)

    def refuse(*_a, **_k):
        raise AssertionError("started Prefect for a run with nothing to compute")

    monkeypatch.setattr(flows, "server_configured", lambda: False)
    monkeypatch.setattr(prefect_setup, "start_ephemeral_server", refuse)
    monkeypatch.setattr(flows, "r1_pipeline", refuse)
    summary = cli_json("run", "--preset", "micro", "--root", str(root), "--run-id", "quick", "--json")
    assert summary["status"] == "succeeded" and {s["status"] for s in summary["stages"].values()} == {"cached"}
    first = RunStore(root).load("micro-1")
    assert all(summary["stages"][n]["path"] == first.stages[n].path for n in STAGES)
    assert (root / "runs" / "quick" / "report" / "report.md").is_file()
    assert commands._nothing_to_orchestrate(cfg, list(STAGES), root)


def test_run_from_until_reuses_before_and_stops_after(micro_copy, tmp_path):
    root, _ = micro_copy
    # --until: stops after rl_zero, every stage up to it a cache hit; the run is `partial`
    code, out = cli("run", "--preset", "micro", "--root", str(root), "--run-id", "part", "--until", "rl_zero",
                    "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["status"] == "partial"
    stages = summary["stages"]
    assert [n for n in STAGES if stages[n]["status"] == "cached"] == ["problems", "base", "rl_zero"]
    assert all(stages[n]["status"] == "pending" for n in STAGES[STAGES.index("cold_start"):])
    # --from: a changed sft is computed, the stages before it are only reused
    code, out = cli("run", "--preset", "micro", "--root", str(root), "--run-id", "from-sft", "--from", "sft",
                    "--until", "sft", "--set", "sft.lr=0.0007", "--json")
    assert code == 0
    stages = json.loads(out)["stages"]
    assert [stages[n]["status"] for n in STAGES[:STAGES.index("sft") + 1]] == ["cached"] * 4 + ["ran"]
    # ... and one not in the cache is an error naming it, with nothing computed
    code, _ = cli("run", "--preset", "micro", "--root", str(root), "--run-id", "from-new", "--from", "sft",
                  "--set", "base.steps=3")
    assert code == 2
    record = RunStore(root).load("from-new")
    assert record.stages["base"].status == "failed" and "no cached artifact" in record.stages["base"].error
    assert all(record.stages[n].status == "pending" for n in STAGES[STAGES.index("rl_zero"):])


def test_run_from_after_until_is_refused(tmp_path, capsys):
    code, _ = cli("run", "--preset", "micro", "--root", str(tmp_path), "--from", "sft", "--until", "base")
    assert code == 2
    assert "--from sft comes after --until base" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before any record is written


def test_rerun_one_stage_with_new_config_marks_downstream_stale(micro_copy):
    root, run_id = micro_copy
    before = RunStore(root).load(run_id)
    code, _ = cli("stage", "sft", "--run", run_id, "--root", str(root), "--set", "sft.lr=0.0007")
    assert code == 0
    after = RunStore(root).load(run_id)
    assert after.stages["sft"].status == "ran"
    assert after.stages["sft"].path != before.stages["sft"].path
    assert after.config["sft"]["lr"] == 0.0007
    for up in ("problems", "base", "rl_zero", "cold_start"):
        assert after.stages[up] == before.stages[up]  # upstream untouched
    for down in ("rl_reasoning", "rejection_sampling", "dpo", "distill", "evaluate"):
        assert after.stages[down].status == "stale"
    assert after.status == "stale"
    code, out = cli("runs", "--root", str(root))
    assert "stale" in out
    # one command brings the run up to date: sft is a hit on its own artifact (its "ran" entry
    # stays as it was), every stale stage after it is recomputed
    code, _ = cli("stage", "sft", "--run", run_id, "--root", str(root), "--downstream")
    assert code == 0
    final = RunStore(root).load(run_id)
    assert final.status == "succeeded"
    assert final.stages["sft"] == after.stages["sft"]
    assert all(final.stages[d].status == "ran" for d in ("rl_reasoning", "rejection_sampling", "distill", "evaluate"))


def test_cached_stage_rerun_and_force(micro_copy):
    root, run_id = micro_copy
    before = RunStore(root).load(run_id).stages["cold_start"]
    code, _ = cli("stage", "cold_start", "--run", run_id, "--root", str(root))
    # a hit on the artifact the record already names: its "ran" entry (and time) stay as they were
    assert code == 0 and RunStore(root).load(run_id).stages["cold_start"] == before and before.status == "ran"
    code, _ = cli("stage", "cold_start", "--run", run_id, "--root", str(root), "--force")
    assert code == 0 and RunStore(root).load(run_id).stages["cold_start"].status == "ran"


def test_corrupt_upstream_artifact_is_named(micro_copy, capsys):
    root, run_id = micro_copy
    record = RunStore(root).load(run_id)
    from pathlib import Path

    data = Path(record.stages["cold_start"].path) / "cold_start.parquet"
    data.write_bytes(data.read_bytes()[:-7] + b"garbage")
    code, _ = cli("stage", "sft", "--run", run_id, "--root", str(root), "--force")
    assert code == 2
    err = capsys.readouterr().err
    assert "upstream cold_start artifact is unusable" in err and "corrupt" in err


def test_report_writes_markdown_and_plots(micro_run, tmp_path):
    root, run_id, _ = micro_run
    code, out = cli("report", run_id, "--root", str(root), "--out", str(tmp_path))
    assert code == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Evaluation" in md and "| rl_zero |" in md
    assert "| pass@1 | maj@k | pass@k |" in md  # the headline metrics, not only the secondary ones
    assert (tmp_path / "rl_curves.png").stat().st_size > 5000
    assert (tmp_path / "eval.png").stat().st_size > 5000
    assert "## Inference-time scaling" in md and "weighted_maj@k" in md
    assert (tmp_path / "scaling.png").stat().st_size > 5000


def test_bad_user_problem_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"question": "1 + 1", "answer": "2"}\n')  # no `prompt` column
    code, _ = cli("run", "--preset", "micro", "--root", str(tmp_path / "root"), "--set", "problems.source=file",
                  "--set", f"problems.path={json.dumps(str(bad))}")
    assert code == 2
    err = capsys.readouterr().err
    assert "stage problems failed" in err and "prompt" in err
    record = RunStore(tmp_path / "root").list()[0]
    assert record.status == "failed" and record.stages["problems"].status == "failed"


def test_training_stages_write_tensorboard_scalars(micro_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, run_id, _ = micro_run
    logdir = root / "runs" / run_id / "tensorboard"
    assert sorted(p.name for p in logdir.iterdir()) == ["base", "distill", "rl_reasoning", "rl_zero", "sft"]
    events = EventAccumulator(str(logdir / "rl_zero"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"reward_mean", "kl", "entropy", "grad_norm", "lr", "eval/pass@1"} <= tags, sorted(tags)
    steps = [e.step for e in events.Scalars("reward_mean")]
    assert steps == list(range(1, RunStore(root).load(run_id).config["rl_zero"]["steps"] + 1))
    sft = EventAccumulator(str(logdir / "sft"))
    sft.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(sft.Tags()["scalars"])


def test_export_a_runs_stage_and_generate_from_the_export(micro_run, tmp_path):
    root, run_id, _ = micro_run
    code, _ = cli("export", f"{run_id}/rl_zero", str(tmp_path / "hf"), "--format", "hf", "--root", str(root))
    assert code == 0
    code, out = cli("generate", "--model", str(tmp_path / "hf"), "--prompt", "What is 1 + 1?",
                    "--max-new-tokens", "4", "--json")
    ref_code, ref = cli("generate", "--model", f"{run_id}/rl_zero", "--prompt", "What is 1 + 1?",
                        "--max-new-tokens", "4", "--json", "--root", str(root))
    assert code == ref_code == 0
    assert json.loads(out)["token_ids"] == json.loads(ref)["token_ids"]
    code, _ = cli("export", f"{run_id}/problems", str(tmp_path / "x"), "--format", "hf", "--root", str(root))
    assert code == 2 and not (tmp_path / "x").exists()
