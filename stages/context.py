"""What a stage receives besides its config and inputs: seed, device, logging, progress.

A stage knows nothing of Prefect; the orchestrator hands it a context whose `log` and
`progress` may forward to Prefect's logger, and tests hand it the plain default.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

_log = logging.getLogger("r1flow")


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
    """

    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    run_dir: Path | None = None
    log: Callable[[str], None] = field(default=_log.info)
    progress: Callable[..., Iterable[Any]] = field(default=_tqdm_progress)
