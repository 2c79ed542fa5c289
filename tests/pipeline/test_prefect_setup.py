"""Prefect set-up by the CLI: the temporary server dies with r1flow; user errors read as one line."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_sigkilled_r1flow_takes_its_temporary_prefect_server_with_it(tmp_path):
    """Issue 20: `kill -9` of `r1flow run` left Prefect's uvicorn server running for good (14 of 14)."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.prefect_setup import start_ephemeral_server
        assert start_ephemeral_server()
        print("up", flush=True)
        time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "up"
        servers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "uvicorn" in " ".join(c.cmdline())]
        assert servers, "no temporary server started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 30
        while not all(_gone(s.pid) for s in servers) and time.time() < deadline:
            time.sleep(0.2)
        assert all(_gone(s.pid) for s in servers)
    finally:
        proc.kill()
        for c in psutil.Process().children(recursive=True):
            if "uvicorn" in " ".join(c.cmdline()) and str(tmp_path) in c.environ().get("PREFECT_HOME", ""):
                c.kill()


def test_user_error_tracebacks_go_to_the_log_not_the_console(tmp_path):
    """Issue 20: a user error inside a stage printed ~115 lines with two tracebacks."""
    from artifacts import ArtifactError
    from pipeline.prefect_setup import user_facing_logs

    console = logging.StreamHandler(stream := __import__("io").StringIO())
    root = logging.getLogger()
    root.addHandler(console)
    log = tmp_path / "run.log"
    try:
        with user_facing_logs(log):
            for exc in (ArtifactError("stage problems failed: column 'answer' not found"), RuntimeError("a bug")):
                try:
                    raise exc
                except Exception:
                    logging.getLogger("r1flow.test").error("Task run failed", exc_info=True)
    finally:
        root.removeHandler(console)
    shown = stream.getvalue()
    assert shown.count("Traceback") == 1 and "RuntimeError: a bug" in shown  # a bug keeps its traceback
    assert "ArtifactError" not in shown
    assert log.read_text().count("Traceback") == 2  # everything in the log
