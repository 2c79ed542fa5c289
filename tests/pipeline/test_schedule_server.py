"""Scheduled distillation against a real local Prefect server (SQLite in a temp dir).

Starts `prefect server start` on a free loopback port, creates the distill deployment with a cron
schedule through `r1flow schedule`, triggers a run with `prefect deployment run`, serves it with
`r1flow serve`, and waits for the student checkpoint to appear in the teacher's run.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts import RunStore, verify
from tests.pipeline.prefect_server import free_port, server_env, start_server, stop, wait_healthy

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_scheduled_distill_runs_on_a_real_server(micro_copy, tmp_path):
    root, teacher = micro_copy
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = server_env(tmp_path / "prefect-home", api)
    server = start_server(port, env)
    serve = None
    try:
        wait_healthy(api, server, timeout=120)
        r1flow = [sys.executable, "-m", "pipeline.cli"]
        sched = subprocess.run(
            [*r1flow, "schedule", "distill", "--teacher", teacher, "--student", "micro", "--cron", "0 3 * * *",
             "--name", "nightly", "--set", "distill.steps=3", "--root", str(root)],
            env=env, capture_output=True, text=True, timeout=120)
        assert sched.returncode == 0, sched.stderr
        assert "distill/nightly" in sched.stdout

        trigger = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "distill/nightly"],
                                 env=env, capture_output=True, text=True, timeout=120)
        assert trigger.returncode == 0, trigger.stdout + trigger.stderr

        before = RunStore(root).load(teacher).stages["distill"].path
        serve_log = tmp_path / "serve.log"
        serve = subprocess.Popen([*r1flow, "serve", "--root", str(root)], env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=serve_log.open("w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        entry = None
        while time.time() < deadline:
            entry = RunStore(root).load(teacher).stages["distill"]
            if entry.path != before and entry.status == "ran":
                break
            time.sleep(1)
        assert entry is not None and entry.path != before and entry.status == "ran", entry
        verify(entry.path)
        assert (Path(entry.path) / "students" / "micro").is_dir()
        record = RunStore(root).load(teacher)
        assert record.config["distill"]["steps"] == 3
        assert record.stages["evaluate"].status == "stale"  # downstream of the new students
        # Ctrl-C stops the server cleanly: exit 0, no traceback, no un-awaited coroutine
        serve.send_signal(signal.SIGINT)
        try:
            rc = serve.wait(timeout=60)
        except subprocess.TimeoutExpired:  # show where it hangs: faulthandler dumps every thread on SIGABRT
            serve.send_signal(signal.SIGABRT)
            serve.wait(timeout=30)
            raise AssertionError("`r1flow serve` ignored Ctrl-C for 60 s; its threads:\n"
                                 + serve_log.read_text()[-20000:]) from None
        assert rc == 0, serve_log.read_text()
        out = serve_log.read_text()
        assert "never awaited" not in out and "Traceback" not in out, out
        assert "r1flow serve: stopped" in out
        # ... and so does SIGTERM (Prefect's own handler leaves its async stop un-awaited)
        serve = subprocess.Popen([*r1flow, "serve", "--root", str(root)], env=env, stdout=serve_log.open("w"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while "serving distill/nightly" not in serve_log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # the runner is polling
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0, serve_log.read_text()
        out = serve_log.read_text()
        assert "never awaited" not in out and "Traceback" not in out, out
        assert "r1flow serve: stopped" in out
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
