"""A small process pool whose tasks have a hard wall-clock timeout.

Why not ``concurrent.futures.ProcessPoolExecutor`` or ``multiprocessing.Pool``: neither can kill
the one worker that is stuck (sympy looping inside C code holds the GIL, so no thread or
``signal.alarm`` in the worker can stop it), and killing a worker breaks the whole executor. Here
each worker is its own process with its own socket and runs one task at a time; when a task
passes its deadline the parent SIGKILLs that worker, records "timeout", starts a replacement and
carries on with the rest of the batch on the other workers. Spare workers (as many as there are
workers, by default) are kept forked and ready, so a replacement takes over at once while the next
spare starts in the background: the time a hostile item costs the batch is the timeout itself.
A task running longer than ``straggle_s`` (much longer than a normal comparison) stops holding
one of the ``workers`` slots, so the spares take the next tasks beside it: the rest of the batch
is not queued behind items that are likely to time out anyway (at most ``workers + spares`` tasks
run at once).

Replacements must be cheap, so workers are forked from a *zygote*: a fresh interpreter
(``python -m rewards._zygote``) that imports the task module (and sympy) once and then forks a worker
whenever the parent sends it one end of a new socket pair. Forking from the zygote instead of from
the caller keeps workers free of the caller's threads (Prefect, torch) and, unlike multiprocessing's
spawn/forkserver, never re-imports the caller's ``__main__`` (a training script would otherwise be
re-run, torch and all, in every worker). Each worker caps its address space (``memory_mb``) so a
runaway allocation ends in ``MemoryError`` in the worker, not in the machine swapping.

Tasks are named as ``"module:function"`` strings and their arguments must pickle; only our own code
submits tasks, model output only ever travels as string arguments. POSIX only (fork, SCM_RIGHTS).
"""
from __future__ import annotations

import atexit
import gc
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Sequence

_READY = "ready"
_START_TIMEOUT_S = 60.0
_MAX_START_FAILURES = 5


@dataclass(frozen=True)
class TaskResult:
    """status: "ok" (value holds the function's return), "timeout", "crashed" or "error"."""

    status: str
    value: Any = None
    detail: str = ""


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _limit_memory(memory_mb: int) -> None:
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # not available here: the timeout still bounds the task


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die with its zygote (and so with the caller, whose exit ends the zygote):
    a worker busy in sympy would otherwise run on, orphaned, until its computation ends."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):  # elsewhere: a thread that notices the parent is gone
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the zygote died before we asked
        os._exit(1)


def _worker_loop(conn: Connection, fn) -> None:
    """Say (READY, pid), then receive (task_id, args), send (task_id, status, value) until EOF."""
    conn.send((_READY, os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, args = msg
        try:
            out = (task_id, "ok", fn(*args))
        except MemoryError:
            out = (task_id, "error", "memory limit")
        except RecursionError:
            out = (task_id, "error", "recursion limit")
        except Exception as exc:  # any failure of one task is that task's result
            out = (task_id, "error", f"{type(exc).__name__}: {str(exc)[:200]}")
        try:
            conn.send(out)
        except (OSError, ValueError):
            return


def zygote_main(ctl_fd: int, spec: str, memory_mb: int) -> None:
    """Import the task once, then fork one worker per socket received on ``ctl_fd``; exit when
    the caller closes (or, dying, drops) that socket, taking the workers along.

    If the task's module defines ``warmup()``, it runs here first, so every forked worker starts
    with warm caches (sympy imports much of itself lazily on first use), and once more in each
    worker before it says READY, so the pages a comparison writes are copied while the worker
    idles as a spare (measured: a fresh worker's first 20 comparisons took ~40 ms without it).
    """
    fn = _resolve(spec)
    warmup = getattr(importlib.import_module(spec.partition(":")[0]), "warmup", None)
    if callable(warmup):
        warmup()
    gc.freeze()  # the warm objects stay out of the collector's sweeps: fewer copy-on-write faults
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed workers
    ctl = socket.socket(fileno=ctl_fd)
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(ctl, 1, 1)
        except OSError:
            return
        if not fds:  # the parent closed the control socket: it is gone
            return
        zygote_pid = os.getpid()
        if os.fork() == 0:
            ctl.close()
            try:
                _die_with_parent(zygote_pid)
                _limit_memory(memory_mb)
                if callable(warmup):  # pay this process's copy-on-write faults before READY,
                    warmup()  # while it waits as a spare, not on its first real task
                _worker_loop(Connection(fds[0]), fn)
            finally:
                os._exit(0)
        os.close(fds[0])


class _Zygote:
    """The parent's handle on a zygote process."""

    def __init__(self, spec: str, memory_mb: int):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewards._zygote", str(theirs.fileno()), spec, str(memory_mb)],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.ctl = ours
        self.ctl.settimeout(_START_TIMEOUT_S)

    def fork_worker(self) -> Connection:
        """Ask for a worker; returns at once with its socket (the worker says READY and its pid)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(self.ctl, [b"f"], [theirs.fileno()])
        finally:
            theirs.close()
        return Connection(ours.detach())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.ctl.close()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Worker:
    def __init__(self, zygote: _Zygote):
        self.conn = zygote.fork_worker()
        self.pid: int | None = None  # known once the worker says READY
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None
        self.dispatched = 0.0  # when the current task was sent
        self.deadline = 0.0

    def kill(self) -> None:
        """SIGKILL the worker; one that never said READY exits on its closed socket instead."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.conn.close()


class WorkerPool:
    """``workers`` concurrent tasks of ``spec`` ("module:function"), each with a timeout.

    Lazily started on the first :meth:`map`, reused across calls, closed at interpreter exit.
    Safe to call from several threads (calls are serialized) and across ``os.fork`` (a child
    process starts its own zygote and workers instead of sharing the parent's sockets).
    """

    def __init__(self, spec: str, workers: int = 2, timeout_s: float = 3.0, memory_mb: int = 2048,
                 spares: int | None = None, straggle_s: float | None = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.spares = workers if spares is None else spares
        if self.spares < 0:
            raise ValueError("spares must be >= 0")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.spec = spec
        self.n_workers = workers
        self.timeout_s = timeout_s
        # default: a quarter of the timeout, at most 0.5 s (a normal comparison takes milliseconds)
        self.straggle_s = min(0.5, timeout_s / 4) if straggle_s is None else straggle_s
        self.memory_mb = memory_mb
        self.restarts = 0
        self._zygote: _Zygote | None = None
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._start_failures = 0
        atexit.register(self.close)

    # -- lifecycle
    def _spawn(self) -> _Worker:
        for attempt in range(2):
            if self._zygote is None or not self._zygote.alive():
                self._zygote = _Zygote(self.spec, self.memory_mb)
            try:
                return _Worker(self._zygote)
            except OSError:
                self._zygote.close()
                self._zygote = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _ensure_workers(self) -> None:
        if self._pid != os.getpid():  # a forked child: the sockets belong to the parent
            self._workers, self._zygote, self._pid = [], None, os.getpid()
        while len(self._workers) < self.n_workers + self.spares:
            self._workers.append(self._spawn())

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = self._spawn()
        self.restarts += 1

    def close(self) -> None:
        """Stop all workers and the zygote."""
        if self._pid != os.getpid():
            self._workers, self._zygote = [], None
            return
        for w in self._workers:
            w.kill()
        self._workers = []
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    @property
    def processes(self) -> int:
        """Worker processes held (ready or starting): ``workers + spares`` once started."""
        return len(self._workers)

    def worker_pids(self) -> list[int]:
        """Pids of the worker processes that are up (the ``workers`` plus the spares)."""
        return [w.pid for w in self._workers if w.pid is not None]

    # -- work
    def map(self, args_list: Sequence[tuple], timeout_s: float | None = None) -> list[TaskResult]:
        """Run the function on each argument tuple; results in input order.

        A task running past ``timeout_s`` (default: the pool's) gets status "timeout" and its
        worker is replaced; a worker that dies gets "crashed"; an exception gets "error".
        """
        if not args_list:
            return []
        timeout = self.timeout_s if timeout_s is None else timeout_s
        with self._lock:
            self._ensure_workers()
            return self._run(list(args_list), timeout)

    def _dispatch(self, pending: deque, args_list: list[tuple], timeout: float,
                  results: list[TaskResult | None]) -> None:
        now = time.monotonic()
        busy = sum(self._holds_slot(w, now) for w in self._workers)
        for w in list(self._workers):
            if w.ready and w.task is None and pending and busy < self.n_workers:
                busy += 1
                i = pending.popleft()
                try:
                    w.conn.send((i, args_list[i]))
                except (OSError, ValueError):
                    results[i] = TaskResult("crashed", detail="worker socket closed")
                    self._replace(w)
                    continue
                w.task, w.dispatched = i, time.monotonic()
                w.deadline = w.dispatched + timeout

    def _holds_slot(self, w: _Worker, now: float) -> bool:
        """A running task counts against `workers` until it has run `straggle_s`."""
        return w.task is not None and now - w.dispatched < self.straggle_s

    def _run(self, args_list: list[tuple], timeout: float) -> list[TaskResult]:
        results: list[TaskResult | None] = [None] * len(args_list)
        pending = deque(range(len(args_list)))
        self._start_failures = 0
        while pending or any(w.task is not None for w in self._workers):
            self._dispatch(pending, args_list, timeout, results)
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            deadlines = [w.deadline if w.task is not None else w.started + _START_TIMEOUT_S
                         for w in waiting]
            now = time.monotonic()
            if pending:  # wake when a running task turns straggler and frees its slot
                deadlines += [w.dispatched + self.straggle_s for w in waiting if self._holds_slot(w, now)]
            for conn in wait([w.conn for w in waiting], max(0.0, min(deadlines) - time.monotonic())):
                self._receive(next(w for w in self._workers if w.conn is conn), results)
            self._enforce_deadlines(timeout, results)
            if self._start_failures >= _MAX_START_FAILURES:
                raise RuntimeError(f"reward workers for {self.spec!r} fail to start "
                                   "(see the zygote's error above)")
        return [r if r is not None else TaskResult("crashed", detail="lost") for r in results]

    def _receive(self, w: _Worker, results: list[TaskResult | None]) -> None:
        """Handle one message (or the death) of worker ``w``."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            if w.task is not None:
                results[w.task] = TaskResult("crashed", detail="worker died")
            elif not w.ready:
                self._start_failures += 1  # e.g. the zygote could not import the task
            self._replace(w)
            return
        if isinstance(msg, tuple) and msg[0] == _READY:
            w.ready, w.pid, self._start_failures = True, msg[1], 0
            return
        task_id, status, value = msg
        if task_id == w.task:
            results[task_id] = (TaskResult("ok", value) if status == "ok"
                                else TaskResult(status, detail=str(value)))
            w.task = None

    def _enforce_deadlines(self, timeout: float, results: list[TaskResult | None]) -> None:
        """Kill and replace every worker past its task's deadline (or its start-up deadline)."""
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline:
                results[w.task] = TaskResult("timeout", detail=f"over {timeout:g}s")
                self._replace(w)
            elif not w.ready and now >= w.started + _START_TIMEOUT_S:
                self._start_failures += 1
                self._replace(w)
