import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artifacts import (
    ArtifactError,
    ArtifactStore,
    RunStore,
    cache_key,
    read_manifest,
    read_table,
    verify,
    write_table,
)

SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float64())])
REPO = Path(__file__).resolve().parents[2]


def _produce(rows=3):
    def produce(out: Path):
        write_table(pa.table({"id": [f"p{i}" for i in range(rows)], "score": [i / 2 for i in range(rows)]}),
                    out / "scores.parquet", SCHEMA)
        (out / "checkpoint").mkdir()
        (out / "checkpoint" / "weights.bin").write_bytes(b"\x01\x02")
        return {"mean_score": 0.5}

    return produce


def test_manifest_round_trip(tmp_path):
    store = ArtifactStore(tmp_path)
    key = cache_key("sft", {"lr": 1e-3}, {"base": "abc"}, "v1")
    m = store.write("sft", key, {"lr": 1e-3}, {"base": "abc"}, _produce(), {"scores.parquet": SCHEMA}, code="v1")
    back = read_manifest(store.path_for("sft", key))
    assert back == m
    assert back.stage == "sft" and back.config == {"lr": 1e-3} and back.inputs == {"base": "abc"}
    assert back.rows == {"scores.parquet": 3}
    assert back.summary == {"mean_score": 0.5}
    assert back.files == ["checkpoint/weights.bin", "scores.parquet"]
    assert store.lookup("sft", key) == m
    assert verify(store.path_for("sft", key)) == m


def test_write_that_raises_publishes_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(out: Path):
        (out / "half.parquet").write_bytes(b"PAR1 partial")
        raise RuntimeError("stage died")

    with pytest.raises(RuntimeError):
        store.write("sft", "k" * 64, {}, {}, boom)
    assert store.lookup("sft", "k" * 64) is None
    assert list((tmp_path / "artifacts" / "sft").iterdir()) == []  # temp dir removed too


def test_write_killed_midway_leaves_no_artifact(tmp_path):
    """SIGKILL a writer mid-stage: no artifact appears; the next write cleans its temp dir."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from artifacts import ArtifactStore
        def produce(out):
            (out / "part.parquet").write_bytes(b"PAR1 half written")
            print("writing", flush=True)
            time.sleep(60)
        ArtifactStore({str(tmp_path)!r}).write("sft", "a" * 64, {{}}, {{}}, produce)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ArtifactStore(tmp_path)
    assert store.lookup("sft", "a" * 64) is None
    assert not store.path_for("sft", "a" * 64).exists()
    leftovers = list((tmp_path / "artifacts" / "sft").glob(".tmp-*"))
    assert len(leftovers) == 1  # the dead writer's temp dir, invisible to readers
    store.write("sft", "b" * 64, {}, {}, _produce(), code="v")
    assert not leftovers[0].exists()  # cleaned: its writer is gone


def test_forced_rewrite_replaces_artifact(tmp_path):
    store = ArtifactStore(tmp_path)
    store.write("sft", "c" * 64, {}, {}, _produce(3), code="v")
    m = store.write("sft", "c" * 64, {}, {}, _produce(5), code="v")
    assert read_manifest(store.path_for("sft", "c" * 64)).rows == {"scores.parquet": 5} == m.rows


def test_schema_violation_is_refused(tmp_path):
    store = ArtifactStore(tmp_path)

    def bad(out: Path):
        pq.write_table(pa.table({"id": ["a"], "score": ["not a float"]}), out / "scores.parquet")

    with pytest.raises(ArtifactError, match="column 'score' has type string, expected double"):
        store.write("sft", "d" * 64, {}, {}, bad, {"scores.parquet": SCHEMA})
    assert store.lookup("sft", "d" * 64) is None


def test_read_table_names_missing_and_mistyped_columns(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"score": ["a"]}), p)
    with pytest.raises(ArtifactError) as e:
        read_table(p, SCHEMA)
    assert "missing column 'id'" in str(e.value) and "column 'score' has type string" in str(e.value)


def test_read_bad_inputs(tmp_path):
    with pytest.raises(ArtifactError, match="no such file"):
        read_table(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("id,score\na,1\n")
    with pytest.raises(ArtifactError, match="not a Parquet file"):
        read_table(junk)
    empty = tmp_path / "empty.parquet"
    write_table(SCHEMA.empty_table(), empty, SCHEMA)
    assert read_table(empty, SCHEMA).num_rows == 0
    with pytest.raises(ArtifactError, match="not an artifact"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    with pytest.raises(ArtifactError, match="missing fields"):
        read_manifest(tmp_path)


def test_corruption_is_detected(tmp_path):
    store = ArtifactStore(tmp_path)
    store.write("sft", "e" * 64, {}, {}, _produce(), code="v")
    path = store.path_for("sft", "e" * 64)
    (path / "checkpoint" / "weights.bin").write_bytes(b"\x09\x09")
    with pytest.raises(ArtifactError, match="corrupt"):
        verify(path)
    (path / "checkpoint" / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        verify(path)


def test_cache_key_changes_exactly_when_an_ingredient_changes():
    base = cache_key("sft", {"lr": 1e-3, "steps": 10}, {"base": "h1", "cold_start": "h2"}, "v1")
    # Same ingredients, different dict order: same key.
    assert base == cache_key("sft", {"steps": 10, "lr": 1e-3}, {"cold_start": "h2", "base": "h1"}, "v1")
    assert base != cache_key("sft", {"lr": 2e-3, "steps": 10}, {"base": "h1", "cold_start": "h2"}, "v1")
    assert base != cache_key("sft", {"lr": 1e-3, "steps": 10}, {"base": "h1", "cold_start": "h3"}, "v1")
    assert base != cache_key("sft", {"lr": 1e-3, "steps": 10}, {"base": "h1", "cold_start": "h2"}, "v2")
    assert base != cache_key("rl_zero", {"lr": 1e-3, "steps": 10}, {"base": "h1", "cold_start": "h2"}, "v1")


def test_content_hash_ignores_time_but_not_bytes(tmp_path):
    a = ArtifactStore(tmp_path / "a").write("sft", "f" * 64, {}, {}, _produce(3), code="v")
    time.sleep(1.1)
    b = ArtifactStore(tmp_path / "b").write("sft", "f" * 64, {}, {}, _produce(3), code="v")
    c = ArtifactStore(tmp_path / "c").write("sft", "f" * 64, {}, {}, _produce(4), code="v")
    assert a.content_hash == b.content_hash != c.content_hash


def test_run_record_round_trip_and_staleness(tmp_path):
    runs = RunStore(tmp_path)
    rec = runs.create({"run": {"seed": 1}}, ["problems", "base", "sft"], preset="micro", run_id="r1")
    rec.stages["problems"].status = "ran"
    rec.stages["base"].status = "cached"
    rec.stages["sft"].status = "ran"
    assert rec.mark_stale_after("problems", ["problems", "base", "sft"]) == ["base", "sft"]
    runs.save(rec)
    back = runs.load("r1")
    assert back == rec and back.stages["sft"].status == "stale"
    assert [r.run_id for r in runs.list()] == ["r1"]
    with pytest.raises(ArtifactError, match="no run 'nope'"):
        runs.load("nope")
