"""How fast `r1flow inspect` opens a large Parquet file (issue: 1M rows in under a second).

    python bench/inspect_dataset.py [--rows 1000000]

Prints one JSON line: seconds to inspect with defaults, with --columns, and with --where.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.inspect import inspect_dataset, render, resolve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rollouts.parquet"
        n = args.rows
        table = pa.table({
            "step": np.arange(n) // 64,
            "problem_id": [f"p{i % 5000}" for i in range(n)],
            "completion": [f"<think> step {i} </think> <answer> {i % 97} </answer>" for i in range(n)],
            "reward": rng.random(n),
        })
        pq.write_table(table, path, compression="zstd", row_group_size=128_000)
        size_mb = path.stat().st_size / 1e6
        timings = {}
        for label, kw in [("default", {}), ("columns", {"columns": ["reward"]}),
                          ("where", {"where": ["reward > 0.999"]})]:
            t0 = time.perf_counter()
            render(inspect_dataset(resolve(str(path)), rows=5, **kw))
            timings[label] = round(time.perf_counter() - t0, 4)
    print(json.dumps({"rows": n, "file_mb": round(size_mb, 1), "inspect_s": timings}))


if __name__ == "__main__":
    main()
