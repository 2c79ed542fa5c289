"""`r1flow runs`: runs with their status, stages and headline metrics."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from artifacts import RunRecord, RunStore

# One headline number per stage, shown by `r1flow runs` when the stage reports it.
HEADLINE = {
    "problems": "train_rows",
    "base": "final_loss",
    "rl_zero": "final_reward_mean",
    "cold_start": "kept",
    "sft": "final_val_loss",
    "rl_reasoning": "final_reward_mean",
    "rejection_sampling": "kept",
    "dpo": "final_margin",
    "distill": "students",
    "evaluate": "best_pass@1",
}


def run_summary(record: RunRecord) -> dict[str, Any]:
    """The machine-readable view of one run (`r1flow runs --json`, `r1flow run --json`)."""
    return {
        "run_id": record.run_id,
        "status": record.status,
        "created": record.created,
        "preset": record.preset,
        "stages": {
            name: {"status": e.status, "path": e.path, "seconds": e.seconds, "summary": e.summary}
            for name, e in record.stages.items()
        },
    }


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def list_runs(root: Path, as_json: bool = False) -> str:
    """Every run, readable or not: a run whose record cannot be read is listed as `unreadable`."""
    records, unreadable = RunStore(root).scan()
    if as_json:
        broken = [{"run_id": rid, "status": "unreadable", "error": why} for rid, why in unreadable.items()]
        return json.dumps([run_summary(r) for r in records] + broken, default=str)
    if not records and not unreadable:
        return f"no runs under {Path(root) / 'runs'}"
    lines = []
    for rid, why in unreadable.items():
        lines.append(f"{rid}  unreadable  {why}")
    for r in records:
        lines.append(f"{r.run_id}  {r.status:<9}  preset={r.preset}  created {r.created}")
        for name, e in r.stages.items():
            key = HEADLINE.get(name)
            head = f"{key}={_fmt(e.summary[key])}" if key and key in e.summary else ""
            lines.append(f"    {name:<19} {e.status:<8} {head}")
    return "\n".join(lines)
