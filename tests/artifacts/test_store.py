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


def test_forced_rewrite_publishes_beside_never_over(tmp_path):
    """A published directory is immutable: a second artifact of the key goes to `<key>.2`."""
    store = ArtifactStore(tmp_path)
    first = store.publish("sft", "c" * 64, {}, {}, _produce(3), code="v")
    second = store.publish("sft", "c" * 64, {}, {}, _produce(5), code="v")
    assert first.path == store.path_for("sft", "c" * 64)
    assert second.path == first.path.with_name(first.path.name + ".2")
    assert verify(first.path).rows == {"scores.parquet": 3}  # untouched: a record naming it still holds
    assert verify(second.path).rows == {"scores.parquet": 5}
    assert store.find("sft", "c" * 64).path == second.path  # the newest is the cache hit
    assert store.lookup("sft", "c" * 64) == second.manifest


def test_temp_dir_of_writer_killed_before_rename_is_cleaned_at_once(tmp_path):
    """Killed after its stage finished but before the rename: the next write removes the temp dir."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import artifacts.store as store
        store.os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die right before publishing
        store.ArtifactStore({str(tmp_path)!r}).write("sft", "a" * 64, {{}}, {{}}, lambda out: {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    leftovers = list((tmp_path / "artifacts" / "sft").glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").is_file()
    ArtifactStore(tmp_path).write("sft", "b" * 64, {}, {}, _produce(), code="v")
    assert not leftovers[0].exists()  # its writer is gone: removed now, not an hour later


def test_verify_rehashes_only_files_whose_signature_changed(tmp_path, monkeypatch):
    import artifacts.store as store_mod

    store = ArtifactStore(tmp_path)
    path = store.publish("sft", "g" * 64, {}, {}, _produce(), code="v").path
    assert (path / ".hashes.json").is_file()
    monkeypatch.setattr(store_mod, "_RACY_NS", 0)  # stand-in for "the files are older than 2 s"
    verify(path)  # remembers every file's hash with its signature
    reads = []
    real = store_mod.file_sha256
    monkeypatch.setattr(store_mod, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    verify(path)
    assert reads == []  # nothing re-read: a stat per file
    verify(path, full=True)
    assert sorted(reads) == ["scores.parquet", "weights.bin"]  # `r1flow verify`: every byte
    reads.clear()
    (path / "checkpoint" / "weights.bin").write_bytes(b"\x09\x09")  # same size, new mtime
    with pytest.raises(ArtifactError, match=r"corrupt \(checkpoint/weights.bin has sha256"):
        verify(path)
    assert reads == ["weights.bin"]


def test_full_verify_catches_what_the_signature_cannot(tmp_path, monkeypatch):
    """A sidecar that vouches for a changed file fools the cheap check, never `full=True`."""
    store = ArtifactStore(tmp_path)
    path = store.publish("sft", "h" * 64, {}, {}, _produce(), code="v").path
    weights = path / "checkpoint" / "weights.bin"
    weights.write_bytes(b"\x07\x07")
    st = weights.stat()
    m = read_manifest(path)
    side = json.loads((path / ".hashes.json").read_text())
    side["files"]["checkpoint/weights.bin"] = {
        "sig": [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino],
        "sha256": m.file_hashes["checkpoint/weights.bin"], "recorded_ns": time.time_ns() + 10**12}
    (path / ".hashes.json").write_text(json.dumps(side))
    assert verify(path) == m
    with pytest.raises(ArtifactError, match="corrupt"):
        verify(path, full=True)


def test_unlisted_file_in_an_artifact_is_corruption(tmp_path):
    store = ArtifactStore(tmp_path)
    path = store.publish("sft", "i" * 64, {}, {}, _produce(), code="v").path
    (path / "checkpoint" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="files not in the manifest"):
        verify(path)


def test_second_writer_of_a_key_waits_for_the_first(tmp_path):
    import threading

    store = ArtifactStore(tmp_path)
    said, order = [], []
    with store.lock("sft", "j" * 64):
        t = threading.Thread(target=lambda: _locked(store, said, order))
        t.start()
        deadline = time.time() + 30
        while not said and time.time() < deadline:
            time.sleep(0.05)
        order.append("first done")
    t.join(30)
    assert said and "waiting for another r1flow process (pid" in said[0]
    assert order == ["first done", "second"]


def _locked(store, said, order):
    with store.lock("sft", "j" * 64, on_wait=said.append):
        order.append("second")


def test_a_run_owned_by_another_process_is_refused(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from artifacts import RunStore
        runs = RunStore({str(tmp_path)!r})
        runs.create({{}}, ["problems"], run_id="r1")
        with runs.lock("r1"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ArtifactError, match=rf"run r1 is in use by another r1flow process \(pid {proc.pid}\)"):
            with RunStore(tmp_path).lock("r1"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with RunStore(tmp_path).lock("r1"):  # the holder died: the kernel released its lock
        with RunStore(tmp_path).lock("r1"):  # reentrant within a process
            pass


def test_unreadable_run_record_is_listed_not_hidden(tmp_path):
    from pipeline.runs_view import list_runs

    runs = RunStore(tmp_path)
    runs.create({}, ["problems"], run_id="good")
    (tmp_path / "runs" / "bad").mkdir()
    (tmp_path / "runs" / "bad" / "run.json").write_text("{truncated")
    records, unreadable = runs.scan()
    assert [r.run_id for r in records] == ["good"] and list(unreadable) == ["bad"]
    assert "not valid JSON" in unreadable["bad"] or "Expecting" in unreadable["bad"]
    text = list_runs(tmp_path)
    assert "bad  unreadable" in text and "good" in text
    listed = json.loads(list_runs(tmp_path, as_json=True))
    assert {"run_id": "bad", "status": "unreadable"}.items() <= listed[-1].items()


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
