"""What a stage receives besides its config and inputs: seed, device, logging, progress, metrics.

A stage knows nothing of Prefect; the orchestrator hands it a context whose `log` and
`progress` may forward to Prefect's logger, and tests hand it the plain default.

Live metrics: a training loop calls `track(step, scalars)` every step (the orchestrator forwards
them to the run's trackers, e.g. TensorBoard) and `flush_metrics(table)` every `log_every` steps,
which replaces `run_dir/metrics.parquet` atomically, so `r1flow inspect RUN/STAGE/metrics`
reads the rows so far while the stage runs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

_log = logging.getLogger("r1flow")

LIVE_METRICS = "metrics.parquet"  # in `run_dir` while a stage runs


def _no_tracking(step: int, scalars: dict[str, float]) -> None:
    return None


def _tqdm_progress(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)


@dataclass
class StageContext:
    """Runtime facts a stage needs that are not part of its cache key.

    Attributes:
        seed: the run's seed; a stage derives its own generators from it.
        device: "cpu", "cuda", "cuda:1" or "auto".
        dtype: "fp32", "bf16" or "auto".
        run_dir: a directory that survives a crash, for resume checkpoints.
        log: one-line messages (forwarded to Prefect's logger under orchestration).
        progress: wraps an iterable in a progress bar.
        track: receives each step's scalars (`track(step, {"loss": ...})`) for live trackers.
        shard: "fsdp" to shard the weights, gradients and optimizer moments of the next-token
            training loop across ranks (FSDP2); "none" replicates them (DDP). One process: no effect.
        sampler: for the sampling-only stages, a factory (model, tokenizer, batch_size) -> Sampler of
            an external backend that serves one model whatever checkpoint the stage loads (an
            OpenAI-compatible server: `stages.sampling.server_sampler`); None = the local torch
            sampler on the stage's checkpoint. Its settings enter the cache key (`pipeline.runner`).
    """

    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    run_dir: Path | None = None
    log: Callable[[str], None] = field(default=_log.info)
    progress: Callable[..., Iterable[Any]] = field(default=_tqdm_progress)
    track: Callable[[int, dict[str, float]], None] = field(default=_no_tracking)
    shard: str = "none"
    sampler: Callable[[Any, Any, int], Any] | None = None

    def flush_metrics(self, table: Any) -> None:
        """Replace `run_dir/metrics.parquet` with `table` (a pyarrow Table of the rows so far)
        atomically; nothing without a `run_dir`."""
        if self.run_dir is None:
            return
        import pyarrow.parquet as pq

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LIVE_METRICS
        tmp = path.with_name(f".{LIVE_METRICS}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
