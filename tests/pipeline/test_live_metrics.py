"""Live metrics: `inspect RUN/rl_zero/metrics` shows the rows so far while rl_zero is still running
(the stage flushes metrics.parquet into its scratch directory every `log_every` steps), and the
TensorBoard scalars written so far are readable; the run is killed mid-stage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from artifacts import RunStore
from tests.pipeline.cli_helpers import cli

ARGS = ["--preset", "micro", "--set", "base.steps=2", "--set", "base.eval_every=2", "--set", "rl_zero.steps=200",
        "--set", "rl_zero.eval_every=0", "--set", "rl_zero.log_every=1", "--set", 'run.trackers=["tensorboard"]']


def _scalars(logdir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.is_dir():
        return []
    events = EventAccumulator(str(logdir))
    events.Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_inspect_shows_rl_zero_metrics_while_it_runs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PYTHONUNBUFFERED="1", PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")  # a loaded machine starts it slowly
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *ARGS, "--root", str(root),
                             "--run-id", "live"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline, info, tb_steps = time.time() + 600, None, []
        while time.time() < deadline and proc.poll() is None:
            if RunStore(root).exists("live") and RunStore(root).load("live").stages["rl_zero"].status == "running":
                code, out = cli("inspect", "live/rl_zero/metrics", "--root", str(root), "--json", "--rows", "50")
                if code == 0:
                    info = json.loads(out)
                    tb_steps = _scalars(root / "runs" / "live" / "tensorboard" / "rl_zero", "reward_mean")
                    if info["rows"] > 0 and tb_steps:
                        break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before rl_zero showed live metrics"
        record = RunStore(root).load("live")
        assert record.stages["rl_zero"].status == "running" and record.stages["rl_zero"].path is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert info is not None and info["rows"] > 0
    names = {r["name"] for r in info["head"]}
    assert {"reward_mean", "kl", "entropy", "grad_norm", "lr"} <= names, names
    assert tb_steps and tb_steps[0] == 1
