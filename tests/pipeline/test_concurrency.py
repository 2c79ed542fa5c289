"""Two `r1flow run`s on one root at once, and `r1flow stage --force` during a run (issue 20).

Afterwards every run record names artifacts that exist and verify (every byte re-read), each
stage's recorded content hash is its artifact's, and each artifact's recorded inputs are the
hashes its run's record names for those stages: no run is built on another's half-written or
replaced state. The per-key lock makes exactly one run build each stage; the other waits and
takes the cache hit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts import RunStore, verify
from pipeline.config import STAGES, load_config, stage_module

pytestmark = pytest.mark.slow  # three processes, two full micro runs: minutes on a busy machine
ARGS = ["--preset", "micro", "--set", "base.checkpoint_every=1", "--set", "rl_zero.steps=4"]


def _cli(root: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONUNBUFFERED="1", PREFECT_HOME=str(root.parent / "prefect-home"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--root", str(root)], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _consistent(root: Path, run_id: str) -> None:
    record = RunStore(root).load(run_id)
    for name, entry in record.stages.items():
        if not entry.path:
            continue
        manifest = verify(entry.path, full=True)  # exists, and every byte hashes to its manifest
        assert manifest.content_hash == entry.content_hash, (run_id, name)
        if entry.status == "stale":
            continue
        for up in stage_module(name).INPUTS:
            assert manifest.inputs[up] == record.stages[up].content_hash, (run_id, name, up)


def test_two_runs_and_a_forced_stage_on_one_root(tmp_path):
    root = tmp_path / "root"
    RunStore(root).create(load_config("micro", overrides=ARGS[3::2]).to_dict(), STAGES, preset="micro", run_id="z")
    a = _cli(root, "run", *ARGS, "--run-id", "a", "--json")
    b = _cli(root, "run", *ARGS, "--run-id", "b", "--json")
    deadline = time.time() + 1200
    while time.time() < deadline and a.poll() is None:  # wait until run a is past problems and base
        try:
            if RunStore(root).load("a").stages["rl_zero"].status in ("running", "ran", "cached"):
                break
        except Exception:
            pass
        time.sleep(0.5)
    same_run = _cli(root, "stage", "problems", "--run", "a", "--force")
    other_run = _cli(root, "stage", "problems", "--run", "z", "--force")
    same_out, same_err = same_run.communicate(timeout=900)
    other_out, other_err = other_run.communicate(timeout=900)
    a_out, a_err = a.communicate(timeout=1800)
    b_out, b_err = b.communicate(timeout=1800)

    assert a.returncode == 0, a_err[-3000:]
    assert b.returncode == 0, b_err[-3000:]
    assert same_run.returncode == 2 and "run a is in use by another r1flow process" in same_err, same_err[-2000:]
    assert other_run.returncode == 0, other_err[-3000:]
    runs = {rid: json.loads(out.strip().splitlines()[-1]) for rid, out in (("a", a_out), ("b", b_out))}
    assert runs["a"]["status"] == runs["b"]["status"] == "succeeded"
    for name in STAGES:  # one process built each stage key; the other waited and reused it
        statuses = {runs["a"]["stages"][name]["status"], runs["b"]["stages"][name]["status"]}
        assert statuses == {"ran", "cached"}, (name, statuses)
        assert runs["a"]["stages"][name]["path"] == runs["b"]["stages"][name]["path"]
    z = RunStore(root).load("z")
    assert z.stages["problems"].status == "ran"
    assert z.stages["problems"].path == runs["a"]["stages"]["problems"]["path"] + ".2"  # beside, not over
    for run_id in ("a", "b", "z"):
        _consistent(root, run_id)
