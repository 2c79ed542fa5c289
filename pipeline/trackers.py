"""Live metric trackers for a run's training stages (`run.trackers`).

A stage calls `StageContext.track(step, scalars)` every step; the runner hands it the `track` of
the trackers the run config names. "tensorboard" writes event files (torch's `SummaryWriter`, the
`tensorboard` package) under `<root>/runs/<run_id>/tensorboard/<stage>/`, one scalar per name,
flushed every few seconds so TensorBoard shows a stage while it trains:

    tensorboard --logdir r1flow-data/runs/<run_id>/tensorboard
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Protocol

FLUSH_SECONDS = 5


class Tracker(Protocol):
    def track(self, step: int, scalars: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class NoTracker:
    def track(self, step: int, scalars: dict[str, float]) -> None:
        return None

    def close(self) -> None:
        return None


class TensorBoardTracker:
    """Scalars as TensorBoard event files in `logdir`, created at the first scalar (stages that
    track nothing leave no directory)."""

    def __init__(self, logdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer needs the tensorboard package
            raise ImportError("run.trackers = ['tensorboard'] needs `pip install tensorboard`") from e
        self._open = lambda: SummaryWriter(log_dir=str(logdir), flush_secs=FLUSH_SECONDS)
        self.writer = None

    def track(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            self.writer = self._open()
        for name, value in scalars.items():
            value = float(value)
            if math.isfinite(value):
                self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trackers:
    """Several trackers as one."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def track(self, step: int, scalars: dict[str, float]) -> None:
        for t in self.trackers:
            t.track(step, scalars)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


TRACKERS: dict[str, Callable[[Path], Tracker]] = {"tensorboard": TensorBoardTracker}


def open_trackers(names: list[str], logdir: Path) -> Tracker:
    """The trackers `names` (keys of `TRACKERS`) writing for one stage under `logdir`."""
    if not names:
        return NoTracker()
    return Trackers([TRACKERS[n](logdir) for n in names])
