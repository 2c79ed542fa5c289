"""How `r1flow run` / `r1flow stage` set Prefect up: a temporary server that dies with r1flow, and
user errors printed as one line (tracebacks in the run's log file, or on screen with --verbose).

The temporary server. Without `PREFECT_API_URL`, Prefect 3.8 starts its ephemeral API on first use
(`prefect.server.api.server.SubprocessASGIServer`, one per process, a `python -m uvicorn` child) and
stops it at exit; a SIGKILLed `r1flow run` cannot, and the server ran on for good. r1flow starts
that same instance itself, from the main thread, with the Linux parent-death signal set in the
child (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), so the kernel kills the server when r1flow dies however
it dies; Prefect then finds it running and reuses it. (The signal fires when the *thread* that
forked the child exits, hence the main thread.) Elsewhere than Linux, Prefect starts it as before.

The user's view. A stage that rejects its input raises `StageError` (one clear message); Prefect
logs it with a traceback twice (task, flow). On the console those records keep their message and
lose the traceback of a user error; the full records, tracebacks included, go to
`runs/<run_id>/r1flow.log`. `--verbose` keeps tracebacks on screen too.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_PR_SET_PDEATHSIG = 1


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the child die with this process (Linux), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # bound here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:  # in the child, between fork and exec: no imports, no locks
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def start_ephemeral_server() -> bool:
    """Start Prefect's temporary API server now, bound to die with this process.

    Returns True when this call started it; False when a server is configured (PREFECT_API_URL),
    ephemeral mode is off, it already runs, this is not the main thread, or the platform has no
    parent-death signal (Prefect then starts it itself on first use, as before).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    hook = _parent_death_hook()
    if (hook is None or PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()
            or threading.current_thread() is not threading.main_thread()):
        return False
    from prefect.server.api import server as prefect_server

    instance = prefect_server.SubprocessASGIServer()
    if instance.running:
        return False
    real = prefect_server.subprocess
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(real.__dict__)
    shim.Popen = lambda *args, **kwargs: real.Popen(*args, preexec_fn=hook, **kwargs)  # type: ignore[attr-defined]
    prefect_server.subprocess = shim  # only for this call, in this thread, before any flow runs
    try:  # its start-up timeout and telemetry: Prefect's settings (pipeline.cli.PREFECT_DEFAULTS)
        instance.start()
    finally:
        prefect_server.subprocess = real
    return True


def _is_user_error(exc: BaseException | None) -> bool:
    from pipeline.cli import _is_user_error as user_error

    return isinstance(exc, Exception) and user_error(exc)


class _UserErrorsWithoutTraceback(logging.Formatter):
    """Formats like `inner`, minus the traceback of a user error (the message stays)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and _is_user_error(record.exc_info[1]):
            saved = record.exc_info, record.exc_text
            record.exc_info, record.exc_text = None, None
            try:
                return self.inner.format(record)
            finally:
                record.exc_info, record.exc_text = saved
        return self.inner.format(record)


@contextmanager
def user_facing_logs(log_path: Path, verbose: bool = False) -> Iterator[None]:
    """For the duration: every log record (tracebacks included) also goes to `log_path`; console
    handlers drop the tracebacks of user errors unless `verbose`."""
    import prefect  # noqa: F401  (Prefect configures logging on import; wrap what it set up)

    root = logging.getLogger()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler.setLevel(logging.INFO)
    wrapped: list[tuple[logging.Handler, logging.Formatter | None]] = []
    if not verbose:
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                wrapped.append((handler, handler.formatter))
                handler.setFormatter(_UserErrorsWithoutTraceback(handler.formatter))
    root.addHandler(file_handler)
    try:
        yield
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        for handler, formatter in wrapped:
            handler.setFormatter(formatter)  # type: ignore[arg-type]
