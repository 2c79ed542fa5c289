"""Regenerate the README's results sections from real runs.

    python scripts/update_readme.py                 # runs `r1flow run --preset tiny` (cached stages reused)
    python scripts/update_readme.py --run RUN_ID    # uses an existing run
    python scripts/update_readme.py --real-model RUN_ID --control RUN_ID   # the SmolLM2 section

The first two write docs/eval.png and docs/rl_curves.png (from `r1flow report`) and replace the
text between the README's `<!-- results:start -->` and `<!-- results:end -->` markers with the
run's eval table, stage timings and the plots. `--real-model` does the same for a
`--preset smollm2-135m` run between `<!-- real-model:start -->` and `<!-- real-model:end -->`
(docs/real_model_*.png), adding the control run's rl_zero row (the same preset with the accuracy
reward's weight set to 0). Nothing in those sections is edited by hand.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from artifacts import RunStore  # noqa: E402
from pipeline.report import eval_rows, eval_table_markdown, write_report  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
REAL_START, REAL_END = "<!-- real-model:start -->", "<!-- real-model:end -->"


def replace_section(start: str, end: str, section: str) -> None:
    readme = (REPO / "README.md").read_text()
    if start not in readme or end not in readme:
        raise SystemExit(f"README.md lacks the {start} / {end} markers")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    (REPO / "README.md").write_text(head + start + "\n" + section + "\n" + end + tail)


PLOTS = {"eval.png": "evaluation per checkpoint", "rl_curves.png": "RL curves"}


def control_row(rl_dir: Path, label: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An eval-table row from a GRPO stage's last in-training eval (pass@1, format rate, length)."""
    metrics = pq.read_table(rl_dir / "metrics.parquet").to_pylist()
    last = max(m["step"] for m in metrics if m["name"] == "eval/pass@1")
    value = {m["name"]: m["value"] for m in metrics if m["step"] == last}
    params = next((r.get("params") for r in rows if r["checkpoint"] == "rl_zero"), None)
    return {"checkpoint": label, "params": params, "pass@1": value["eval/pass@1"],
            "format_rate": value.get("eval/format_rate"), "mean_length": value.get("eval/mean_length")}


def results_section(root: Path, run_id: str, prefix: str = "", control_id: str | None = None) -> str:
    """A run's eval table (plus, with a control run, its rl_zero row after the run's), stage timings
    and plots, the plots copied to docs/<prefix><name>."""
    record = RunStore(root).load(run_id)
    report = write_report(root, run_id)
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    plots = []
    for png, alt in PLOTS.items():
        if (report.parent / png).exists():
            shutil.copy(report.parent / png, docs / f"{prefix}{png}")
            plots.append(f"![{alt}](docs/{prefix}{png})")
    rows = eval_rows(Path(record.stages["evaluate"].path))
    if control_id is not None:
        control = RunStore(root).load(control_id)
        weights = control.config["rl_zero"]["rewards"]
        label = f"rl_zero (control: accuracy weight {weights.get('accuracy', 0)})"
        if getattr(control.stages.get("evaluate"), "path", None):
            extra = [dict(r, checkpoint=label) for r in eval_rows(Path(control.stages["evaluate"].path))
                     if r["checkpoint"] == "rl_zero"]
        else:  # a control run `--until rl_zero`: its last in-training eval (same test split, k, T)
            extra = [control_row(Path(control.stages["rl_zero"].path), label + "ᵃ", rows)]
        at = next((i + 1 for i, r in enumerate(rows) if r["checkpoint"] == "rl_zero"), len(rows))
        rows = rows[:at] + extra + rows[at:]
    total = sum(e.seconds or 0 for e in record.stages.values())
    timing = ", ".join(f"{n} {e.seconds:.0f}s" for n, e in record.stages.items() if e.seconds)
    lines = [
        f"Run `{run_id}`" + (f" and control run `{control_id}`" if control_id else "")
        + f" (preset `{record.preset}`, seed {record.config['run']['seed']}), {platform.machine()} CPU, "
        f"{total / 60:.1f} min of stage time in all ({timing}).",
        "pass@1 is the mean over k samples at T=0.6, top-p 0.95 on the held-out test split."
        + (" ᵃ The control's own last rl_zero eval (the same test problems, k and sampling settings); "
           "– where it measures nothing." if control_id else ""),
        "",
        eval_table_markdown(rows),
    ]
    lines += [x for plot in plots for x in ("", plot)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="an existing run id (default: run the tiny preset now)")
    ap.add_argument("--root", type=Path, default=REPO / "r1flow-data")
    ap.add_argument("--real-model", default=None, metavar="RUN_ID",
                    help="a finished `--preset smollm2-135m` run: write the README's real-model section instead")
    ap.add_argument("--control", default=None, metavar="RUN_ID",
                    help="with --real-model: the control run (rl_zero's accuracy weight 0)")
    args = ap.parse_args()
    if args.real_model is not None:
        replace_section(REAL_START, REAL_END, results_section(args.root, args.real_model, "real_model_", args.control))
        print(f"README real-model section updated from run {args.real_model}")
        return
    run_id = args.run
    if run_id is None:
        out = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--preset", "tiny", "--root",
                              str(args.root), "--json"], check=True, capture_output=True, text=True, cwd=REPO)
        run_id = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
    replace_section(START, END, results_section(args.root, run_id))
    print(f"README results updated from run {run_id}")


if __name__ == "__main__":
    main()
