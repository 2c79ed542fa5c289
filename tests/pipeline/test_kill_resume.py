"""Killing `r1flow run` during a stage, then running it again, resumes instead of restarting."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts import RunStore, verify
from pipeline.config import STAGES

ARGS = ["--preset", "micro", "--set", "rl_zero.steps=8", "--set", "rl_zero.checkpoint_every=1"]


def _run(root: Path, run_id: str, **kw) -> subprocess.Popen:
    # Both runs share one Prefect home (its SQLite database holds the device concurrency slot
    # that the killed run never released), isolated from the user's ~/.prefect.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONUNBUFFERED="1", PREFECT_HOME=str(root.parent / "prefect-home"))
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *ARGS, "--root", str(root),
                             "--run-id", run_id, "--json"], env=env, text=True, start_new_session=True, **kw)


@pytest.mark.slow  # two whole micro runs in subprocesses: 2-6 min here, a third of the fast suite
def test_killed_run_resumes_from_the_interrupted_stage(tmp_path):
    root = tmp_path / "root"
    first = _run(root, "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    resume_states = []
    while time.time() < deadline and first.poll() is None:
        # a complete state: its LATEST pointer is written last (the folder exists while the first is saved)
        resume_states = list((root / "work" / "rl_zero").glob("*/grpo_resume/LATEST"))
        if resume_states:
            break
        time.sleep(0.2)
    assert resume_states, "rl_zero never saved a resume state"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    record = RunStore(root).load("killed")
    assert record.stages["problems"].status == "ran" and record.stages["base"].status == "ran"
    # the killed process cannot update its record: read back, its "running" entries say interrupted
    assert record.status == "interrupted"
    assert record.stages["rl_zero"].status == "interrupted" and record.stages["rl_zero"].path is None
    assert not list((root / "artifacts" / "rl_zero").glob("[!.]*"))  # no published rl_zero artifact

    second = _run(root, "again", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    stages = summary["stages"]
    assert stages["problems"]["status"] == "cached" and stages["base"]["status"] == "cached"
    assert all(stages[s]["status"] == "ran" for s in STAGES[2:])
    assert "rl_zero: resuming after step" in err
    for s in STAGES:
        verify(stages[s]["path"])
    assert not list((root / "work" / "rl_zero").glob("*/grpo_resume"))  # resume state cleared
