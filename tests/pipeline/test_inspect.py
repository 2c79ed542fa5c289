import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artifacts import ArtifactStore, RunStore, write_table
from pipeline.cli import main

SCHEMA = pa.schema([("id", pa.string()), ("reward", pa.float64()), ("step", pa.int64())])


@pytest.fixture
def small(tmp_path):
    p = tmp_path / "rollouts.parquet"
    pq.write_table(pa.table({
        "id": ["a", "b", "c", "d"],
        "reward": [0.0, 1.0, 0.5, 1.0],
        "step": [0, 0, 1, 1],
    }), p)
    return p


def test_inspect_text_shows_schema_stats_and_rows(small, capsys):
    assert main(["inspect", str(small), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "rows: 4" in out
    assert "reward" in out and "double" in out
    lines = out.splitlines()
    reward_line = next(line for line in lines if line.startswith("reward"))
    assert "0.0" in reward_line and "1.0" in reward_line  # min and max from the footer
    assert any(line.startswith("a ") for line in lines) and not any(line.startswith("c ") for line in lines)


def test_inspect_json_columns_where(small, capsys):
    assert main(["inspect", str(small), "--json", "--columns", "id", "--where", "reward >= 1", "--rows", "10"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 4 and info["matched"] == 2
    assert info["head"] == [{"id": "b"}, {"id": "d"}]
    assert info["stats"]["step"] == {"nulls": 0, "min": 0, "max": 1}


def test_inspect_substring_and_and(small, capsys):
    assert main(["inspect", str(small), "--json", "--where", "step == 1", "--where", "id ~ d"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)["head"]] == ["d"]


def test_inspect_resolves_run_stage(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    m = store.write("rl_zero", "k" * 64, {}, {}, lambda out: write_table(
        pa.table({"id": ["x"], "reward": [1.0], "step": [3]}), out / "rollouts.parquet", SCHEMA) or {"steps": 3},
        code="v")
    runs = RunStore(tmp_path)
    rec = runs.create({}, ["rl_zero"], run_id="r9")
    rec.stages["rl_zero"].status = "ran"
    rec.stages["rl_zero"].path = str(store.path_for("rl_zero", m.cache_key))
    runs.save(rec)
    assert main(["inspect", "r9/rl_zero/rollouts", "--json", "--root", str(tmp_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["artifact"]["stage"] == "rl_zero" and info["artifact"]["summary"] == {"steps": 3}
    assert info["head"] == [{"id": "x", "reward": 1.0, "step": 3}]


@pytest.mark.parametrize("args, message", [
    (["missing.parquet"], "no such file"),
    (["{junk}"], "not a Parquet file"),
    (["{small}", "--columns", "nope"], "no column(s) ['nope']"),
    (["{small}", "--where", "nope > 1"], "no column 'nope'"),
    (["{small}", "--where", "reward"], "expected 'column op value'"),
    (["norun/sft"], "no such file, artifact directory or RUN_ID/STAGE"),
    (["{small}", "--where", "reward=>1"], "cannot parse '=>1' as an operator and a value"),
    (["{small}", "--where", "reward >= high"], "reward is double, but 'high' is not a number"),
    (["{small}", "--where", "step ~ 1"], "~ (substring) needs a string column"),
    (["{small}", "--rows", "-1"], "--rows -1: expected 0 or more rows"),
])
def test_inspect_bad_input_is_a_clear_error(tmp_path, small, capsys, args, message):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    args = [a.format(junk=junk, small=small) for a in args]
    assert main(["inspect", *args, "--root", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_inspect_empty_parquet(tmp_path, capsys):
    p = tmp_path / "empty.parquet"
    write_table(SCHEMA.empty_table(), p, SCHEMA)
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "rows: 0" in out and "(no rows)" in out


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("run", "stage", "inspect", "runs", "report", "schedule", "serve", "generate"):
        assert verb in out


def test_runs_json_lists_runs(tmp_path, capsys):
    RunStore(tmp_path).create({}, ["problems"], preset="micro", run_id="r1")
    assert main(["runs", "--json", "--root", str(tmp_path)]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert runs[0]["run_id"] == "r1" and runs[0]["stages"]["problems"]["status"] == "pending"


def test_inspect_verifies_artifacts_and_says_when_it_cannot(micro_copy, tmp_path, capsys):
    """Issue 20: a bit-flipped (still readable) Parquet showed with rc 0 although reads 'check the hash'."""
    import json
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from artifacts import RunStore
    from tests.pipeline.cli_helpers import cli

    root, run_id = micro_copy
    data = Path(RunStore(root).load(run_id).stages["problems"].path) / "problems.parquet"
    code, out = cli("inspect", f"{run_id}/problems", "--json", "--root", str(root))
    assert code == 0 and json.loads(out)["verified"] is True
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, size unchanged
    data.write_bytes(bytes(raw))
    for target in (f"{run_id}/problems", str(data)):
        code, _ = cli("inspect", target, "--root", str(root))
        assert code == 2 and "artifact is corrupt" in capsys.readouterr().err
    plain = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"x": [1]}), plain)
    code, out = cli("inspect", str(plain), "--root", str(root))
    assert code == 0 and "content: not verified" in out
def _artifact(tmp_path, stage, tables, summary, run_id="r7"):
    store = ArtifactStore(tmp_path)

    def produce(out):
        for name, table in tables.items():
            pq.write_table(table, out / name)
        return summary

    import stages.cold_start  # noqa: F401  (the stage's SCHEMAS name its main dataset)
    m = store.write(stage, "c" * 64, {}, {}, produce, code="v")
    runs = RunStore(tmp_path)
    rec = runs.create({}, [stage], run_id=run_id)
    rec.stages[stage].status, rec.stages[stage].path = "ran", str(store.path_for(stage, m.cache_key))
    runs.save(rec)


def test_inspect_opens_the_stage_main_dataset_and_lists_the_others(tmp_path, capsys):
    _artifact(tmp_path, "cold_start", {"candidates.parquet": pa.table({"x": [1, 2, 3]}),
                                       "cold_start.parquet": pa.table({"prompt": ["p"], "completion": ["c"]})}, {})
    assert main(["inspect", "r7/cold_start", "--root", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"].endswith("cold_start.parquet") and info["artifact"]["other_datasets"] == ["candidates.parquet"]


def test_inspect_evaluate_shows_summary_and_a_checkpoint_by_metric_table(tmp_path, capsys):
    summary = {"base": {"pass@1": 0.25, "format_rate": 0.5}, "sft": {"pass@1": 0.75, "format_rate": 1.0},
               "best_pass@1": 0.75}
    _artifact(tmp_path, "evaluate", {"eval.parquet": pa.table({"completion": ["x" * 100]}),
                                     "summary.parquet": pa.table({"checkpoint": ["base", "sft"]})}, summary)
    assert main(["inspect", "r7/evaluate", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("summary.parquet")
    header = next(line for line in out.splitlines() if "pass@1" in line and "format_rate" in line)
    cols = header.split()
    assert sorted(cols) == ["format_rate", "pass@1"]
    sft = next(line.split() for line in out.splitlines() if line.startswith("sft "))
    assert dict(zip(cols, sft[1:])) == {"pass@1": "0.75", "format_rate": "1"}
    assert main(["inspect", "r7/evaluate/eval", "--root", str(tmp_path), "--width", "12"]) == 0
    assert "x" * 11 + "…" in capsys.readouterr().out
    assert main(["inspect", "r7/evaluate/eval", "--root", str(tmp_path), "--full"]) == 0
    assert "x" * 100 in capsys.readouterr().out
