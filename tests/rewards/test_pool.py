"""The timeout pool (rewards.pool): stuck workers are killed and replaced, the batch goes on."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards.pool import WorkerPool


@pytest.fixture(scope="module")
def factorial_pool():
    # math.factorial on a huge n runs in C and holds the GIL: only killing the process stops it
    pool = WorkerPool("math:factorial", workers=2, timeout_s=0.5)
    yield pool
    pool.close()


def test_results_in_input_order(factorial_pool):
    out = factorial_pool.map([(n,) for n in range(8)])
    assert [r.value for r in out] == [1, 1, 2, 6, 24, 120, 720, 5040]
    assert all(r.status == "ok" for r in out)


def test_gil_holding_task_times_out_and_batch_continues(factorial_pool):
    before = factorial_pool.restarts
    start = time.perf_counter()
    out = factorial_pool.map([(3,), (10 ** 8,), (4,), (5,)])
    elapsed = time.perf_counter() - start
    assert [r.status for r in out] == ["ok", "timeout", "ok", "ok"]
    assert [out[0].value, out[2].value, out[3].value] == [6, 24, 120]
    assert factorial_pool.restarts == before + 1
    assert elapsed < 0.5 + 5.0  # one timeout plus generous slack on a shared machine


def test_pool_recovers_after_timeouts(factorial_pool):
    factorial_pool.map([(10 ** 8,), (10 ** 8,)])
    assert [r.value for r in factorial_pool.map([(6,)])] == [720]
    assert factorial_pool.processes == factorial_pool.n_workers + factorial_pool.spares


def test_killed_workers_are_really_gone(factorial_pool):
    factorial_pool.map([(1,)])
    before = set(factorial_pool.worker_pids())
    factorial_pool.map([(10 ** 8,), (10 ** 8,)])
    factorial_pool.map([(1,)])
    gone = before - set(factorial_pool.worker_pids())
    assert len(gone) == 2
    time.sleep(0.2)
    for pid in gone:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_normal_tasks_are_not_queued_behind_stragglers():
    """One worker slot, two spares: once the first task has run `straggle_s`, the spares take the
    next tasks beside it, so two stuck tasks cost one timeout, not two in a row."""
    pool = WorkerPool("time:sleep", workers=1, spares=2, timeout_s=1.5, straggle_s=0.2)
    try:
        pool.map([(0,)])
        start = time.perf_counter()
        out = pool.map([(60,), (60,), (0.01,), (0.01,)])
        elapsed = time.perf_counter() - start
        assert [r.status for r in out] == ["timeout", "timeout", "ok", "ok"]
        assert elapsed < 2 * 1.5  # serialised on the one slot it would be >= 3.0 s
        assert pool.processes == 3
    finally:
        pool.close()


def test_spare_workers_take_over_at_once():
    pool = WorkerPool("math:factorial", workers=2, timeout_s=0.5)
    try:
        pool.map([(1,)])
        start = time.perf_counter()
        out = pool.map([(10 ** 8,)] * 4 + [(5,)] * 10)
        elapsed = time.perf_counter() - start
        assert [r.status for r in out] == ["timeout"] * 4 + ["ok"] * 10
        assert elapsed < 0.5 * 4 / 2 + 1.0
    finally:
        pool.close()


def test_exception_in_task_is_an_error_result():
    pool = WorkerPool("operator:truediv", workers=1, timeout_s=2.0)
    try:
        out = pool.map([(1, 0), (6, 3)])
        assert out[0].status == "error" and "ZeroDivisionError" in out[0].detail
        assert out[1].status == "ok" and out[1].value == 2.0
    finally:
        pool.close()


def test_worker_that_dies_is_reported_and_replaced():
    pool = WorkerPool("os:_exit", workers=1, timeout_s=2.0)
    try:
        out = pool.map([(3,), (4,)])
        assert [r.status for r in out] == ["crashed", "crashed"]
        assert pool.restarts == 2
    finally:
        pool.close()


def test_memory_limit_turns_into_an_error():
    pool = WorkerPool("builtins:bytearray", workers=1, timeout_s=5.0, memory_mb=512)
    try:
        out = pool.map([(4 * 1024 ** 3,), (3,)])
        assert out[0].status == "error" and "memory" in out[0].detail
        assert out[1].status == "ok" and out[1].value == bytearray(3)
    finally:
        pool.close()


def test_close_stops_workers():
    pool = WorkerPool("operator:neg", workers=2, timeout_s=2.0)
    assert [r.value for r in pool.map([(1,), (2,)])] == [-1, -2]
    pids = pool.worker_pids()
    pool.close()
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_invalid_configuration():
    with pytest.raises(ValueError):
        WorkerPool("operator:neg", workers=0)
    with pytest.raises(ValueError):
        WorkerPool("operator:neg", timeout_s=0)
    with pytest.raises(ValueError):
        WorkerPool("operator:neg", spares=-1)


def test_task_that_cannot_be_imported_fails_loudly():
    pool = WorkerPool("no_such_module_r1flow:fn", workers=1, timeout_s=1.0, spares=0)
    try:
        with pytest.raises(RuntimeError, match="fail to start"):
            pool.map([(1,)])
    finally:
        pool.close()


def test_workers_die_with_the_caller(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from rewards.pool import WorkerPool\n"
        "pool = WorkerPool('math:factorial', workers=2, timeout_s=600)\n"
        "pool.map([(3,)])\n"
        "print(' '.join(map(str, pool.worker_pids())), flush=True)\n"
        "pool.map([(10 ** 9,), (10 ** 9,)])\n"
    )
    caller = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in caller.stdout.readline().split()]
    assert pids
    time.sleep(0.5)  # the two huge factorials are now running
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 10
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.1)
    assert not alive
