"""Regenerate the README's results section from a real run of the embedded default.

    python scripts/update_readme.py                 # runs `r1flow run --preset tiny` (cached stages reused)
    python scripts/update_readme.py --run RUN_ID    # uses an existing run

Writes docs/eval.png and docs/rl_curves.png (from `r1flow report`) and replaces the text between
the README's `<!-- results:start -->` and `<!-- results:end -->` markers with the run's eval table,
stage timings and the plots. Nothing in that section is edited by hand.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from artifacts import RunStore  # noqa: E402
from pipeline.report import eval_rows, eval_table_markdown, write_report  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="an existing run id (default: run the tiny preset now)")
    ap.add_argument("--root", type=Path, default=REPO / "r1flow-data")
    args = ap.parse_args()
    run_id = args.run
    if run_id is None:
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--preset", "tiny", "--root",
                              str(args.root), "--json"], check=True, capture_output=True, text=True, cwd=REPO)
        run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    record = RunStore(args.root).load(run_id)
    report = write_report(args.root, run_id)
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    for png in ("eval.png", "rl_curves.png"):
        if (report.parent / png).exists():
            shutil.copy(report.parent / png, docs / png)
    rows = eval_rows(Path(record.stages["evaluate"].path))
    total = sum(e.seconds or 0 for e in record.stages.values())
    timing = ", ".join(f"{n} {e.seconds:.0f}s" for n, e in record.stages.items() if e.seconds)
    section = "\n".join([
        START,
        f"Run `{run_id}` (preset `{record.preset}`, seed {record.config['run']['seed']}), "
        f"{platform.machine()} CPU, {total / 60:.1f} min of stage time in all ({timing}).",
        "pass@1 is the mean over k samples at T=0.6, top-p 0.95 on the held-out test split.",
        "",
        eval_table_markdown(rows),
        "",
        "![evaluation per checkpoint](docs/eval.png)",
        "",
        "![RL curves](docs/rl_curves.png)",
        END,
    ])
    readme = (REPO / "README.md").read_text()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    (REPO / "README.md").write_text(head + section + tail)
    print(f"README results updated from run {run_id}")


if __name__ == "__main__":
    main()
