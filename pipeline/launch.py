"""Run one stage as several processes through torchrun (`torch.distributed.run`).

`pipeline.runner.execute_stage` calls `launch_stage` instead of the stage function when the run
asks for more than one process (`run.nproc_per_node` x `run.nnodes` > 1). The launcher writes a
job spec (the run's validated config, the stage's inputs, seed, device, where to write) into the
stage's scratch directory and runs

    python -m torch.distributed.run --nproc_per_node N [--nnodes M --node_rank K --rdzv_endpoint H:P
        | --standalone] --max_restarts 0 -m pipeline.launch SPEC

Every rank runs the stage's ordinary `run(config, inputs, out, ctx)` on the same config and
inputs, inside a gloo (CPU) or NCCL (CUDA) process group (`lm.distributed`); stages split their
work with that module's helpers. Rank 0 writes into the artifact's temporary directory, the other
ranks into throwaway folders, so rank 0 alone writes the artifact; the store publishes it (atomic
rename) only when torchrun exits 0. A rank that raises leaves `errors/rank-<r>.json`; torchrun
then stops the others and the launcher raises `RankFailed` naming the rank and its error. A rank
killed without a word (a signal, the OOM killer) is named from torchrun's failure report.
Nothing is half-written either way: the temporary directory is removed on failure.

Several hosts: every host runs the same `r1flow stage NAME --run ID` with its own
`run.node_rank` and the same `run.rdzv_endpoint` (host:port of node 0); node 0 publishes the
artifact, the other nodes only compute (`participate_only`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any, Callable

from artifacts.store import ArtifactError, atomic_write_text

# Exceptions a stage raises for bad input or divergence (pipeline.runner._USER_FACING): a rank that
# raises one of these failed for a reason the user can fix, and the message says so.
_USER_FACING = ("ValueError", "FileNotFoundError", "FloatingPointError", "NonFiniteError", "ArtifactError",
                "UpstreamMissing", "ConfigError", "CheckpointError")


class RankFailed(ArtifactError):
    """A rank of a multi-process stage failed; the message names the rank and its error."""

    def __init__(self, message: str, rank: int | None = None, user_facing: bool = False) -> None:
        super().__init__(message)
        self.rank = rank
        self.user_facing = user_facing


# Training stages that keep replicated weights under run.shard = "fsdp" (their own loops: GRPO samples
# from the policy every step, DPO and on-policy distillation likewise hold full models).
REPLICATED_TRAINING = ("rl_zero", "rl_reasoning", "dpo")


def world_size(run: Any) -> int:
    """Processes a stage runs as: nproc_per_node x nnodes (from the run's `[run]` settings)."""
    return int(run.nproc_per_node) * int(run.nnodes)


def torchrun_args(run: Any) -> list[str]:
    """The torchrun options for the run's settings: `--standalone` (a free local port) on one
    node without an endpoint, else c10d rendezvous at `run.rdzv_endpoint`."""
    args = ["--nproc_per_node", str(run.nproc_per_node), "--max_restarts", "0"]
    if run.nnodes == 1 and not run.rdzv_endpoint:
        return args + ["--standalone"]
    return args + ["--nnodes", str(run.nnodes), "--node_rank", str(run.node_rank), "--rdzv_backend", "c10d",
                   "--rdzv_endpoint", str(run.rdzv_endpoint), "--rdzv_id", "r1flow"]


def launch_stage(name: str, config: dict[str, Any], preset: str | None, inputs: dict[str, Path], out: Path,
                 scratch: Path, *, run: Any, seed: int, device: str, dtype: str,
                 log: Callable[[str], None] = print, timeout_s: float | None = None) -> dict[str, Any]:
    """Run stage `name` under torchrun; rank 0 writes into `out`; returns the stage's summary.

    Args:
        config: the run's validated config as plain data (`RunConfig.to_dict()`).
        scratch: the stage's scratch directory (resume state lives in it; it survives a crash).
        run: the `[run]` settings (nproc_per_node, nnodes, node_rank, rdzv_endpoint).
        timeout_s: kill the job after this long (None: no limit).
    Raises:
        RankFailed: a rank failed or died; names it.
    """
    job = scratch / f"launch-node{run.node_rank}"  # hosts sharing the scratch folder keep apart
    shutil.rmtree(job, ignore_errors=True)
    (job / "errors").mkdir(parents=True)
    spec = {"stage": name, "config": config, "preset": preset, "inputs": {k: str(v) for k, v in inputs.items()},
            "out": str(out), "scratch": str(scratch), "seed": seed, "device": device, "dtype": dtype,
            "job": str(job), "result": str(job / "result.json"), "errors": str(job / "errors")}
    atomic_write_text(job / "spec.json", json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(run), "-m", "pipeline.launch",
           str(job / "spec.json")]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, run.nproc_per_node))))
    env["PYTHONUNBUFFERED"] = "1"
    log(f"{name}: launching {world_size(run)} processes: torchrun {' '.join(torchrun_args(run))}")
    if run.shard == "fsdp" and name in REPLICATED_TRAINING:
        log(f"{name}: run.shard = \"fsdp\" shards base, sft and distill (mode sft); {name} trains replicated weights")
    tail: deque[str] = deque(maxlen=60)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(Path(__file__).resolve().parent.parent))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if line.startswith(_LOG_PREFIX):
                log(line[len(_LOG_PREFIX):])
        code = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:  # interrupted: stop torchrun, which stops its workers
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code != 0:
        raise _failure(name, job / "errors", list(tail), code, world_size(run))
    if run.node_rank != 0:
        return {}
    result = job / "result.json"
    if not result.is_file():
        raise RankFailed(f"stage {name}: torchrun exited 0 but rank 0 left no result", rank=0)
    summary = json.loads(result.read_text())
    shutil.rmtree(job, ignore_errors=True)
    return summary


_LOG_PREFIX = "[r1flow] "
_TORCHRUN_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n?\s*exitcode\s*:\s*(-?\d+)")


def _failure(name: str, errors: Path, tail: list[str], code: int, world: int) -> RankFailed:
    """The clearest account of a failed job, naming the rank where it started.

    When one rank fails, the others fail next inside a collective ("connection closed by peer"):
    those are consequences. The cause is, in order: the earliest error a rank reported that is
    not such a consequence; else a rank torchrun saw killed by a signal (it could report
    nothing; torchrun's own SIGTERM to the survivors comes last); else the earliest report; else torchrun's last output.
    """
    reports = [json.loads(p.read_text()) for p in errors.glob("rank-*.json")]
    own = sorted((r for r in reports if not _PEER_GONE.search(r["message"])), key=lambda r: r["time"])
    if own:
        return _reported(name, own[0], world)
    died = [(int(r), int(c)) for r, c in _TORCHRUN_FAILURE.findall("\n".join(tail))]
    # torchrun stops the survivors with SIGTERM: a rank killed by another signal came first
    killed = sorted(((r, c) for r, c in died if c < 0), key=lambda rc: rc[1] == -signal.SIGTERM)
    if killed:
        r, c = killed[0]
        return RankFailed(f"stage {name} failed: rank {r} of {world} died (killed by signal {-c}) "
                          "without an error report", rank=r)
    if reports:
        return _reported(name, min(reports, key=lambda r: r["time"]), world)
    if died:
        r, c = died[0]
        return RankFailed(f"stage {name} failed: rank {r} of {world} exited with code {c}", rank=r)
    last = "\n".join(tail[-15:])
    return RankFailed(f"stage {name} failed: torchrun exited with {code}; its last output:\n{last}")


def _reported(name: str, report: dict[str, Any], world: int) -> RankFailed:
    return RankFailed(f"stage {name} failed on rank {report['rank']} of {world}: {report['type']}: "
                      f"{report['message']}", rank=report["rank"], user_facing=report["type"] in _USER_FACING)


# How gloo and NCCL word "another rank went away" inside a collective.
_PEER_GONE = re.compile(r"Connection closed by peer|remote worker crash|Connection reset by peer|"
                        r"NCCL communicator was aborted|ProcessGroupNCCL.*(?:abort|timeout)", re.IGNORECASE)


# -------------------------------------------------------------------------------------- the worker


def _worker(spec_path: str) -> int:
    """One rank: join the process group, run the stage, rank 0 records the summary."""
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = _run_rank(spec, rank)
    except BaseException as e:
        report = {"rank": rank, "type": type(e).__name__, "message": str(e), "time": time.time(),
                  "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]}
        atomic_write_text(Path(spec["errors"]) / f"rank-{rank}.json", json.dumps(report))
        raise
    if rank == 0:
        atomic_write_text(Path(spec["result"]), json.dumps(summary, default=str))
    return 0


def _run_rank(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    from lm import distributed
    from pipeline.config import stage_module, stage_sampler, validate
    from stages.context import StageContext

    name = spec["stage"]
    cfg = validate(spec["config"], stages=(name,), preset=spec["preset"])
    device = distributed.init_from_env(spec["device"])
    try:
        scratch = Path(spec["scratch"])
        if rank == 0:
            out = Path(spec["out"])
        else:  # only global rank 0 writes the artifact; the others' files are thrown away
            out = Path(spec["job"]) / f"rank-{rank}-out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
        ctx = StageContext(seed=spec["seed"], device=device, dtype=spec["dtype"], run_dir=scratch,
                           log=(lambda msg: print(_LOG_PREFIX + msg, flush=True)) if rank == 0 else (lambda _: None),
                           progress=lambda iterable, desc="", total=None: iterable, shard=cfg.run.shard,
                           sampler=stage_sampler(cfg.run, name))
        module = stage_module(name)
        summary = module.run(cfg.stage(name), {k: Path(v) for k, v in spec["inputs"].items()}, out, ctx)
        distributed.barrier()  # no rank leaves (and lets torchrun end the job) before all are done
        if rank != 0:
            shutil.rmtree(out, ignore_errors=True)
        return dict(summary or {})
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
