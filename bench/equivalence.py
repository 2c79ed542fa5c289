"""Score the public answer-equivalence benchmark with the accuracy reward's comparison.

The benchmark (``../shared/benchmarks/equivalence/`` next to the repository, see its README) holds
labelled (gold, pred, expected) rows from the test suites of public answer checkers, one JSONL
file per source. Each ``pred`` is treated as a model's answer text (prose, a box or a bare
expression) and compared with ``gold`` by :func:`rewards.verify`; a verdict agrees when
(score == 1.0) == (expected == 1). Prints one JSON object: agreement per file, then every
disagreement with the reward's reason.

    python bench/equivalence.py [--dir PATH] [--timeout 3] [--workers 2] [--summary]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rewards import accuracy  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "equivalence"


def load_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            row["_line"] = n
            rows.append(row)
    return rows


def score_file(path: Path, pool) -> tuple[dict, list[dict]]:
    rows = load_rows(path)
    agree = 0
    wrong: list[dict] = []
    for row in rows:
        score, reason = accuracy.verify(row["gold"], row["pred"], pool=pool)
        said_equal = score == 1.0
        if said_equal == (row["expected"] == 1):
            agree += 1
        else:
            wrong.append({"file": path.name, "line": row["_line"], "expected": row["expected"],
                          "got": score, "reason": reason, "gold": row["gold"][:300],
                          "pred": row["pred"][:300]})
    stats = {"rows": len(rows), "agree": agree, "agreement": round(agree / max(1, len(rows)), 4)}
    return stats, wrong


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="benchmark directory")
    ap.add_argument("--timeout", type=float, default=accuracy.DEFAULT_TIMEOUT_S)
    ap.add_argument("--workers", type=int, default=accuracy.DEFAULT_WORKERS)
    ap.add_argument("--summary", action="store_true", help="omit the list of disagreements")
    args = ap.parse_args(argv)
    files = sorted(args.dir.glob("*.jsonl"))
    if not files:
        print(f"no *.jsonl files in {args.dir}", file=sys.stderr)
        return 2
    pool = accuracy.configure(workers=args.workers, timeout_s=args.timeout)
    t0 = time.perf_counter()
    per_file: dict[str, dict] = {}
    disagreements: list[dict] = []
    for f in files:
        per_file[f.name], wrong = score_file(f, pool)
        disagreements += wrong
    total_rows = sum(s["rows"] for s in per_file.values())
    total_agree = sum(s["agree"] for s in per_file.values())
    out = {
        "per_file": per_file,
        "overall": {"rows": total_rows, "agree": total_agree,
                    "agreement": round(total_agree / max(1, total_rows), 4)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if not args.summary:
        out["disagreements"] = disagreements
    print(json.dumps(out, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
