"""Run records: `<root>/runs/<run_id>/run.json` maps each stage to its artifact and status.

A run is the user's handle on one pass of the pipeline: `r1flow inspect RUN/STAGE` resolves an
artifact through it, `r1flow stage NAME --run RUN` reruns one stage of it, and `r1flow runs`
lists them. The record is rewritten atomically after every stage transition.

Artifact paths are stored relative to the root (`artifacts/<stage>/<key>`) and resolved against
the root the record is read from, so a record works from any directory and in a copied root.

A run or stage marked "running" names its owner (host:pid). A killed `r1flow run` cannot update
its record, so on reading, a "running" entry whose owner process is gone (on this host) reads
"interrupted"; `r1flow stage NAME --run RUN` resumes such a stage from its scratch state.

One process at a time changes a run: `RunStore.lock(run_id)` (an flock on `runs/<id>/.lock`, held by
`r1flow run` for the whole run and by `r1flow stage` for its stage) refuses a second one with a
message naming the holder, so a `stage --force` can never swap a stage out from under a run still
building on it.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from artifacts.store import ArtifactError, atomic_write_text, default_root, hold_flock

STAGE_STATUSES = ("pending", "running", "ran", "cached", "stale", "failed", "interrupted")
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run lock -> how many times this process holds it (reentrant)
_held_guard = threading.Lock()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_owner() -> str:
    """`host:pid` of this process, recorded on whatever it marks "running"."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_gone(owner: str | None) -> bool:
    """True when `owner` (host:pid) is a process on this host that no longer exists; False when it
    is alive, on another host, or unknown (records written before owners were kept)."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def new_run_id() -> str:
    """Sortable and unique enough for one user's runs: `20261122-051230-3fa9`."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


@dataclass
class StageEntry:
    status: str = "pending"
    path: str | None = None
    cache_key: str | None = None
    content_hash: str | None = None
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    owner: str | None = None  # host:pid of the process running it
    work: str | None = None  # its scratch directory while it runs (live metrics.parquet, resume state)


@dataclass
class RunRecord:
    run_id: str
    created: str
    status: str  # running | succeeded | partial (`run --until`) | stale (some stage's upstream changed) | failed | interrupted
    preset: str | None
    config: dict[str, Any]
    stages: dict[str, StageEntry]
    owner: str | None = None  # host:pid of the process running it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "RunRecord":
        try:
            stages = {k: StageEntry(**v) for k, v in data["stages"].items()}
            record = cls(
                run_id=data["run_id"], created=data["created"], status=data["status"],
                preset=data.get("preset"), config=data.get("config", {}), stages=stages,
                owner=data.get("owner"),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{where}: malformed run record ({e!r})") from e
        for item in (record, *record.stages.values()):  # a killed process left these "running"
            if item.status == "running" and owner_gone(item.owner):
                item.status = "interrupted"
        return record

    def mark_stale_after(self, stage: str, order: Iterable[str]) -> list[str]:
        """Mark every stage after `stage` that has an artifact as stale; return their names."""
        order = list(order)
        stale = []
        for name in order[order.index(stage) + 1:]:
            entry = self.stages.get(name)
            if entry is not None and entry.status in ("ran", "cached"):
                entry.status = "stale"
                stale.append(name)
        return stale


class RunStore:
    """Run records under `<root>/runs`."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.dir = self.root / "runs"

    def create(self, config: dict[str, Any], stages: Iterable[str], preset: str | None = None,
               run_id: str | None = None) -> RunRecord:
        record = RunRecord(
            run_id=run_id or new_run_id(), created=now_iso(), status="running", preset=preset,
            config=config, stages={s: StageEntry() for s in stages}, owner=process_owner(),
        )
        self.save(record)
        return record

    def path(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ArtifactError(f"invalid run id {run_id!r}")
        return self.dir / run_id / RUN_FILE

    def exists(self, run_id: str) -> bool:
        return self.path(run_id).is_file()

    def _absolute(self, stored: str) -> str:
        """An artifact path as stored -> an absolute path under this root. Records written before
        paths were stored relative hold `<root as typed>/artifacts/...`: the part from `artifacts/`
        on is resolved against this root."""
        p = Path(stored)
        if p.is_absolute():
            return stored
        parts = p.parts
        if "artifacts" in parts:
            p = Path(*parts[parts.index("artifacts"):])
        return str(self.root.absolute() / p)

    def _relative(self, path: str) -> str:
        """An absolute artifact path under this root -> the path relative to it (others unchanged)."""
        try:
            return str(Path(path).relative_to(self.root.absolute()))
        except ValueError:
            return path

    def load(self, run_id: str) -> RunRecord:
        path = self.path(run_id)
        if not path.is_file():
            known = ", ".join(r.run_id for r in self.list()[-5:]) or "none"
            raise ArtifactError(f"no run {run_id!r} under {self.dir} (recent runs: {known})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: run record is not valid JSON ({e})") from e
        return self._resolved(RunRecord.from_dict(data, where=str(path)))

    def _resolved(self, record: RunRecord) -> RunRecord:
        for entry in record.stages.values():
            if entry.path:
                entry.path = self._absolute(entry.path)
        return record

    @contextmanager
    def lock(self, run_id: str) -> Iterator[None]:
        """Own the run for a while: ArtifactError naming the holder if another process owns it.

        Reentrant within a process (the CLI takes it, then the flow it calls takes it again).
        """
        path = self.path(run_id).parent / LOCK_FILE
        with _held_guard:
            if _held.get(path):
                _held[path] += 1
                reentered = True
            else:
                reentered = False
        if reentered:
            try:
                yield
            finally:
                with _held_guard:
                    _held[path] -= 1
            return
        with hold_flock(path, what=f"run {run_id}", wait=False):
            with _held_guard:
                _held[path] = 1
            try:
                yield
            finally:
                with _held_guard:
                    _held.pop(path, None)

    def save(self, record: RunRecord) -> None:
        path = self.path(record.run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = record.to_dict()
        for entry in data["stages"].values():
            if entry["path"]:
                entry["path"] = self._relative(str(Path(entry["path"]).absolute()))
        atomic_write_text(path, json.dumps(data, indent=2, default=str))

    def list(self) -> list[RunRecord]:
        """Every readable run record, oldest first (`scan` also names the unreadable ones)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[RunRecord], dict[str, str]]:
        """(readable records oldest first, {run id: why its record is unreadable})."""
        records, unreadable = [], {}
        for path in sorted(self.dir.glob(f"*/{RUN_FILE}")):
            try:
                data = json.loads(path.read_text())
                if not isinstance(data, dict):
                    raise ArtifactError(f"{path}: run record is not a JSON object")
                records.append(self._resolved(RunRecord.from_dict(data, where=str(path))))
            except (ArtifactError, ValueError, OSError) as e:
                unreadable[path.parent.name] = str(e)
        return sorted(records, key=lambda r: (r.created, r.run_id)), unreadable
