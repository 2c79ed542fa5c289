"""`r1flow report RUN_ID`: a Markdown report with PNG plots of a run.

Plots, as a practitioner reads training curves: `rl_curves.png` is a grid with one metric per panel
(eval pass@1 and format rate, batch reward, response length, KL, entropy, clip fraction, loss, grad
norm, language consistency) against the GRPO step, rl_zero and rl_reasoning in fixed colours; rates
on a 0-100% axis. `eval.png` is one panel per metric (pass@1, maj@k, pass@k, greedy accuracy,
format rate; k stated), a labelled bar per checkpoint. `scaling.png` is inference-time scaling
(accuracy against generated tokens per problem for maj@k, weighted majority, best-of-k and pass@k at
k = 1, 2, 4, ... K, plus ORM-weighted majority and ORM best-of-k when the run trained an outcome
reward model; evaluate's scaling.parquet).
Everything is read from the run's artifacts (metrics.parquet in long format step/name/value,
evaluate's summary.parquet), so the report is regenerated, never hand-edited.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from artifacts import ArtifactError, RunRecord, RunStore, code_version, verify
from artifacts.store import atomic_write_text

RL_STAGES = ("rl_zero", "rl_reasoning")
STAGE_COLORS = {"rl_zero": "tab:blue", "rl_reasoning": "tab:orange"}  # one colour per stage in every panel
# The training curves a practitioner reads, one metric per panel: (title, candidate metric names,
# whether it is a rate shown in %). The first name a stage logged is plotted.
RL_PANELS: list[tuple[str, tuple[str, ...], bool]] = [
    ("eval pass@1 (test split)", ("eval/pass@1",), True),
    ("eval format rate", ("eval/format_rate",), True),
    ("batch reward (train)", ("reward_mean", "reward/mean"), False),
    ("response length (tokens)", ("completion_len_mean", "completion_length/mean"), False),
    ("KL to reference", ("kl",), False),
    ("entropy (nats/token)", ("entropy",), False),
    ("clip fraction", ("clip_high", "clip_low"), True),
    ("loss", ("loss",), False),
    ("grad norm (pre-clip)", ("grad_norm",), False),
    ("language consistency", ("language_consistency", "reward/language_consistency"), True),
]
PANEL_COLUMNS = 3
EVAL_BARS = ("pass@1", "maj@k", "pass@k", "greedy_accuracy", "format_rate")


def _metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """name -> [(step, value)] from a long-format metrics.parquet."""
    f = path / "metrics.parquet"
    if not f.is_file():
        return {}
    t = pq.read_table(f, columns=["step", "name", "value"]).to_pydict()
    series: dict[str, list[tuple[float, float]]] = {}
    for s, n, v in zip(t["step"], t["name"], t["value"]):
        if v is not None:
            series.setdefault(n, []).append((s, v))
    return series


def _pick(series: dict[str, Any], candidates: tuple[str, ...]) -> str | None:
    for c in candidates:
        if c in series:
            return c
    return None


def rl_panels(curves: dict[str, dict[str, list[tuple[float, float]]]]) -> list[tuple[str, bool, dict[str, list]]]:
    """The panels there is data for: (title, is_rate, stage -> sorted [(step, value)])."""
    out = []
    for title, candidates, rate in RL_PANELS:
        lines = {}
        for stage, series in curves.items():
            name = _pick(series, candidates)
            if name:
                lines[stage] = sorted(series[name])
        if lines:
            out.append((title, rate, lines))
    return out


def _plot_rl(curves: dict[str, dict[str, list[tuple[float, float]]]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = rl_panels(curves)
    if not panels:
        return []
    cols = min(PANEL_COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, rate, lines) in zip(axes.flat, panels):
        for stage, pts in lines.items():
            xs, ys = zip(*pts)
            ys = [100.0 * y for y in ys] if rate else list(ys)
            ax.plot(xs, ys, label=stage, color=STAGE_COLORS.get(stage), linewidth=1.5,
                    marker="o" if len(xs) <= 12 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step", fontsize=8)
        if rate:
            ax.set_ylabel("%", fontsize=8)
            ax.set_ylim(-2, 102)  # rates on their whole scale: no 0.991-1.000 axes
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncols=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out / "rl_curves.png", dpi=100)
    plt.close(fig)
    return ["rl_curves.png"]


def _plot_eval(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """One panel per metric, one labelled bar per checkpoint (0% bars drawn as a visible stub)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [b for b in EVAL_BARS if rows and any(r.get(b) is not None for r in rows)]
    if not rows or not bars:
        return []
    names = [r["checkpoint"] for r in rows]
    k = rows[0].get("k")
    cols = min(len(bars), 3)
    nrows = -(-len(bars) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(4.2, 0.9 * len(names) + 1.5) * cols, 3.4 * nrows),
                             squeeze=False)
    for ax, metric in zip(axes.flat, bars):
        vals = [100.0 * (r.get(metric) or 0.0) for r in rows]
        drawn = ax.bar(range(len(names)), [max(v, 0.6) for v in vals], color="tab:blue")
        ax.bar_label(drawn, labels=[f"{v:.0f}%" if r.get(metric) is not None else "–" for v, r in zip(vals, rows)],
                     fontsize=8, padding=2)
        title = metric.replace("@k", f"@{k}") if k else metric
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylim(0, 112)
        ax.set_ylabel("%", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(bars):]:
        ax.axis("off")
    fig.suptitle(f"evaluation on the held-out test split (k = {k} samples per problem)" if k
                 else "evaluation on the held-out test split", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=100)
    plt.close(fig)
    return ["eval.png"]


SCALING_METHODS = {"maj": "maj@k", "weighted_maj": "weighted maj@k (log-prob)", "best_of": "best-of-k (log-prob)",
                   "pass": "pass@k", "orm_weighted_maj": "weighted maj@k (ORM)", "orm_best_of": "best-of-k (ORM)"}


def _plot_scaling(path: Path, out: Path) -> list[str]:
    """One panel per method present: accuracy against generated tokens per problem, a line per checkpoint."""
    f = path / "scaling.parquet"
    if not f.is_file():
        return []
    rows = pq.read_table(f).to_pylist()
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    methods = {m: t for m, t in SCALING_METHODS.items() if any(r["method"] == m for r in rows)}
    cols = len(methods) if len(methods) <= 4 else 3  # the ORM's two panels: 2 rows of 3
    nrows = -(-len(methods) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, (method, title) in zip(axes.flat, methods.items()):
        for ckpt in checkpoints:
            pts = sorted((r["tokens_per_problem"], 100.0 * r["accuracy"]) for r in rows
                         if r["checkpoint"] == ckpt and r["method"] == method)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", linewidth=1.5, label=ckpt)
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("generated tokens per problem")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("% correct")
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)
    return ["scaling.png"]


# summary.parquet column -> the name reports show
_DISPLAY = {"pass_at_1": "pass@1", "maj_at_k": "maj@k", "pass_at_k": "pass@k", "weighted_maj_at_k": "weighted_maj@k",
            "orm_weighted_maj_at_k": "orm_weighted_maj@k"}


def eval_rows(path: Path) -> list[dict[str, Any]]:
    """The evaluate stage's summary rows, metric names as reports show them (pass@1, maj@k, pass@k)."""
    f = path / "summary.parquet"
    rows = pq.read_table(f).to_pylist() if f.is_file() else []
    return [{_DISPLAY.get(k, k): v for k, v in r.items()} for r in rows]


def eval_table_markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["checkpoint", "params", "pass@1", "maj@k", "pass@k", "weighted_maj@k", "best_of_k", "orm_weighted_maj@k",
            "orm_best_of_k", "greedy_accuracy", "format_rate", "language_mix_rate", "mean_length"]
    optional = {"orm_weighted_maj@k", "orm_best_of_k"}  # shown when the run has an ORM
    cols = [c for c in cols if rows and c in rows[0] and (c not in optional or any(r.get(c) is not None for r in rows))]
    pct = {"pass@1", "maj@k", "weighted_maj@k", "best_of_k", "orm_weighted_maj@k", "orm_best_of_k", "pass@k",
           "greedy_accuracy", "format_rate", "language_mix_rate"}

    def fmt(c: str, v: Any) -> str:
        if v is None:
            return "–"
        if c in pct:
            return f"{100 * v:.1f}%"
        if c == "params":
            return f"{v / 1e6:.2f}M"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def readable_artifacts(record: RunRecord) -> dict[str, Path]:
    """stage -> artifact directory of every stage that has one, each verified against its manifest;
    ArtifactError when a recorded artifact is missing or corrupt, or when the run has none at all (a report of nothing is not a success)."""
    found = {}
    for name, e in record.stages.items():
        if not e.path:
            continue
        if not (Path(e.path) / "manifest.json").is_file():
            raise ArtifactError(f"run {record.run_id}: the {name} artifact recorded at {e.path} is missing "
                                "(moved or deleted?); rerun it with "
                                f"`r1flow stage {name} --run {record.run_id}`")
        verify(e.path)  # cheap: re-hashes only files whose size/mtime/inode changed since they were hashed
        found[name] = Path(e.path)
    if not found:
        raise ArtifactError(f"run {record.run_id} has no artifacts yet (status {record.status}): nothing to report")
    return found


def cached_plot(root: Path, out: Path, name: str, sources: list[Any], draw: Callable[[], list[str]]) -> bool:
    """Put plot `name` into `out`: drawn by `draw` (which returns the names it wrote), or copied from
    `<root>/reports/plots/` when this code already drew it from the same artifacts (by content
    hash): a rerun whose stages were all reused writes its report without drawing anything.

    Args:
        sources: the run-record entries of the stages the plot reads (their `content_hash`).
    Returns:
        True when `out/name` exists afterwards.
    """
    hashes = [e.content_hash for e in sources]
    cache = Path(root) / "reports" / "plots"
    key = None
    if hashes and all(hashes):
        key = hashlib.sha256(json.dumps([code_version(), name, hashes]).encode()).hexdigest()[:24]
        hit = cache / f"{key}-{name}"
        if hit.is_file():
            shutil.copyfile(hit, out / name)
            return True
    drawn = name in draw()
    if drawn and key is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{key}-{name}.tmp"
            shutil.copyfile(out / name, tmp)
            os.replace(tmp, cache / f"{key}-{name}")
        except OSError:
            pass  # a cache: unwritable, the next report draws again
    return drawn


def write_report(root: Path, run_id: str, out: Path | None = None) -> Path:
    record = RunStore(root).load(run_id)
    readable_artifacts(record)
    out = Path(out) if out is not None else Path(root) / "runs" / run_id / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# r1flow run {run_id}", "", f"status **{record.status}**, preset `{record.preset}`, "
             f"created {record.created}", ""]
    stale = [n for n, e in record.stages.items() if e.status == "stale"]
    if stale:
        first = next(n for n in record.stages if n in stale)
        lines += [f"> **Stale:** {', '.join(stale)} were computed from upstream artifacts that have since "
                  "changed; their numbers below describe the old inputs. Bring the run up to date with "
                  f"`r1flow stage {first} --run {run_id} --downstream`.", ""]
    lines += ["## Stages", "", "| stage | status | seconds | artifact |", "|---|---|---|---|"]
    for name, e in record.stages.items():
        secs = f"{e.seconds:.1f}" if e.seconds is not None else "–"
        lines.append(f"| {name} | {e.status} | {secs} | `{Path(e.path).name if e.path else '–'}` |")
    rl = [s for s in RL_STAGES if s in record.stages and record.stages[s].path]
    drawn = cached_plot(root, out, "rl_curves.png", [record.stages[s] for s in rl],
                        lambda: _plot_rl({s: _metrics(Path(record.stages[s].path)) for s in rl}, out))
    if drawn:
        lines += ["", "## RL curves", "", "![RL curves](rl_curves.png)"]
    ev = record.stages.get("evaluate")
    if ev is not None and ev.path:
        rows = eval_rows(Path(ev.path))
        lines += ["", "## Evaluation", "", eval_table_markdown(rows)]
        if cached_plot(root, out, "eval.png", [ev], lambda: _plot_eval(rows, out)):
            lines += ["", "![evaluation](eval.png)"]
        if cached_plot(root, out, "scaling.png", [ev], lambda: _plot_scaling(Path(ev.path), out)):
            lines += ["", "## Inference-time scaling", "",
                      "Accuracy against generated tokens per problem at k = 1, 2, 4, ... samples "
                      "(weighted vote and best-of-k score each sample by its length-normalised log-probability; "
                      "the ORM ones by the outcome reward model's probability that it is correct).",
                      "", "![inference-time scaling](scaling.png)"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(Path(args.root), args.run_id, args.out)
    if not path.exists():
        raise ArtifactError(f"report for {args.run_id} was not written")
    record = RunStore(Path(args.root)).load(args.run_id)
    stale = [n for n, e in record.stages.items() if e.status == "stale"]
    if stale:
        print(f"r1flow report: warning: stale stages ({', '.join(stale)}) describe old inputs", file=sys.stderr)
    print(f"report: {path}")
    for png in sorted(path.parent.glob("*.png")):
        print(f"plot:   {png}")
    return 0
