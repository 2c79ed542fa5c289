"""Run records: a run or stage left "running" by a process that is gone reads "interrupted"."""
import json
import subprocess
import sys

from artifacts.runs import RunStore, process_owner


def dead_owner() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid names no process now
    return process_owner().rsplit(":", 1)[0] + f":{proc.pid}"


def test_running_entries_of_a_dead_process_read_interrupted(tmp_path):
    runs = RunStore(tmp_path)
    record = runs.create({}, ["base", "rl_zero"], run_id="r1")
    record.stages["base"].status, record.stages["base"].owner = "ran", None
    record.stages["rl_zero"].status = "running"
    record.owner = record.stages["rl_zero"].owner = dead_owner()
    runs.save(record)
    loaded = runs.load("r1")
    assert loaded.status == "interrupted" and loaded.stages["rl_zero"].status == "interrupted"
    assert loaded.stages["base"].status == "ran"
    assert [r.status for r in runs.list()] == ["interrupted"]


def test_running_entries_of_a_live_or_unknown_owner_stay_running(tmp_path):
    runs = RunStore(tmp_path)
    runs.create({}, ["base"], run_id="mine")  # owned by this (live) process
    assert runs.load("mine").status == "running"
    path = runs.path("mine")
    data = json.loads(path.read_text())
    data.pop("owner")  # a record written before owners were kept
    path.write_text(json.dumps(data))
    assert runs.load("mine").status == "running"
    data["owner"] = "some-other-host:1"
    path.write_text(json.dumps(data))
    assert runs.load("mine").status == "running"
