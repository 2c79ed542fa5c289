"""`r1flow verify RUN_ID | PATH`: re-hash every byte of a run's artifacts (or one artifact).

Every other read trusts a file's remembered hash while its size, mtime, ctime and inode are
unchanged (`artifacts.store.HashCache`); this verb reads everything, so it also catches a change
that kept the signature (a restored mtime on a filesystem without ctime, a bad disk block).
It also checks that each stage's artifact is the one the run record names (its content hash).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from artifacts import ArtifactError, RunStore, verify


def verify_run(root: Path, run_id: str) -> list[dict[str, Any]]:
    """One row per stage that has an artifact: stage, path, ok, problem."""
    record = RunStore(root).load(run_id)
    rows = []
    for name, entry in record.stages.items():
        if not entry.path:
            continue
        rows.append({"stage": name, **verify_one(Path(entry.path), entry.content_hash)})
    return rows


def verify_one(path: Path, expected_hash: str | None = None) -> dict[str, Any]:
    try:
        m = verify(path, full=True)
    except ArtifactError as e:
        return {"path": str(path), "ok": False, "problem": str(e)}
    if expected_hash is not None and m.content_hash != expected_hash:
        return {"path": str(path), "ok": False,
                "problem": f"the run record names content {expected_hash[:12]}, the artifact holds {m.content_hash[:12]}"}
    return {"path": str(path), "ok": True, "problem": None, "content_hash": m.content_hash}


def cmd_verify(args: argparse.Namespace) -> int:
    root = Path(args.root)
    target = Path(args.target)
    if target.is_dir():
        rows = [{"stage": None, **verify_one(target)}]
    else:
        rows = verify_run(root, args.target)
        if not rows:
            raise ArtifactError(f"run {args.target} has no artifacts yet")
    if args.json:
        print(json.dumps({"target": args.target, "ok": all(r["ok"] for r in rows), "artifacts": rows}))
    else:
        for r in rows:
            label = r["stage"] or r["path"]
            print(f"{label:<19} {'ok' if r['ok'] else 'CORRUPT'}  {r['problem'] or r['path']}")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        raise ArtifactError(f"{len(bad)} of {len(rows)} artifacts failed verification")
    return 0
