"""What a cached rerun costs as checkpoints grow (issue 18), printed as one JSON line.

    python bench/cached_rerun.py [--sizes-mb 64 512]
    python bench/cached_rerun.py --root DIR [--preset smollm2-135m] [--set K=V ...]  # after one real run on DIR

Store mode (default): for each size, publish an artifact holding a checkpoint file of that many
MB through the artifact store, then time what every cached stage and every read does with it:
`verify` (the hash sidecar: a stat per file), against `verify(full=True)` (`r1flow verify`: every
byte re-read) and a cache-hit lookup + verify. The cached figures should not grow with the size.

Run mode (`--root`): time `r1flow run --preset PRESET --root DIR` (every stage a cache hit when
DIR already holds one run of that preset), in a fresh process as a user would, and report each
checkpoint's size in the run for context.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from artifacts import ArtifactStore, RunStore, cache_key, verify  # noqa: E402


def _seconds(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best, 4)


def store_mode(sizes_mb: list[int]) -> dict[str, object]:
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="cached-rerun-") as tmp:
        store = ArtifactStore(tmp)
        for mb in sizes_mb:
            key = cache_key("sft", {"mb": mb}, {}, "bench")

            def produce(d: Path, mb: int = mb) -> dict:
                (d / "checkpoint").mkdir()
                with open(d / "checkpoint" / "model.safetensors", "wb") as f:
                    block = os.urandom(1 << 20)
                    for _ in range(mb):
                        f.write(block)
                return {}

            start = time.perf_counter()
            path = store.publish("sft", key, {"mb": mb}, {}, produce, code="bench").path
            publish_s = time.perf_counter() - start
            time.sleep(2.1)  # past the sidecar's racy window, as any later rerun is
            verify(path)  # the first read after publishing may re-hash small files once

            def cache_hit() -> None:
                found = store.find("sft", key)
                verify(found.path)

            out[f"{mb}MB"] = {
                "publish_s": round(publish_s, 3),
                "verify_cached_s": _seconds(lambda: verify(path)),
                "cache_hit_s": _seconds(cache_hit),
                "verify_full_s": _seconds(lambda: verify(path, full=True), reps=1),
            }
    return out


def run_mode(root: Path, preset: str, overrides: list[str]) -> dict[str, object]:
    runs = RunStore(root).list()
    if not runs:
        raise SystemExit(f"no run under {root}: do one real `r1flow run --preset {preset} --root {root}` first")
    sizes = {}
    for name, entry in runs[-1].stages.items():
        if entry.path:
            sizes[name] = round(sum(p.stat().st_size for p in Path(entry.path).rglob("*") if p.is_file()) / 2**20, 1)
    start = time.perf_counter()
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--preset", preset, "--root", str(root),
                           "--json", *sets], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"preset": preset, "overrides": overrides, "cached_run_s": round(seconds, 2),
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "statuses": sorted({s["status"] for s in summary["stages"].values()}),
            "artifact_mb": sizes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--root", type=Path, default=None, help="run mode: a root that already holds one run")
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="run mode: the overrides the real run used (repeatable)")
    args = ap.parse_args(argv)
    out = run_mode(args.root, args.preset, args.overrides) if args.root else {"store": store_mode(args.sizes_mb)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
