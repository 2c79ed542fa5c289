"""`r1flow report`'s plots: a grid of training curves and labelled per-checkpoint bars."""
from __future__ import annotations

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
from PIL import Image

from artifacts import ArtifactStore, RunStore
from pipeline.config import STAGES
from pipeline.report import rl_panels, write_report
from stages.metrics import METRICS_SCHEMA


def _metric_rows(scale: float) -> pa.Table:
    rows = []
    for step in range(0, 21):
        for name, v in (("reward_mean", 0.1 * step), ("completion_len_mean", 30 + step), ("kl", 0.01 * step),
                        ("entropy", 1.5 - 0.02 * step), ("clip_high", 0.01), ("loss", -0.1), ("grad_norm", 0.5)):
            rows.append({"step": step, "name": name, "value": v * scale})
        if step % 10 == 0:
            rows.append({"step": step, "name": "eval/pass@1", "value": 0.02 * step * scale})
            rows.append({"step": step, "name": "eval/format_rate", "value": 0.995 + 0.0002 * step})
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


def _fake_run(root) -> None:
    store = ArtifactStore(root)
    runs = RunStore(root)
    record = runs.create({}, STAGES, preset="micro", run_id="r")
    for i, stage in enumerate(("rl_zero", "rl_reasoning")):
        m = store.write(stage, f"{i}" * 64, {}, {}, lambda out, i=i: pq.write_table(
            _metric_rows(1.0 + i), out / "metrics.parquet") or {}, code="v")
        record.stages[stage].status, record.stages[stage].path = "ran", str(store.path_for(stage, m.cache_key))
        record.stages[stage].content_hash = m.content_hash
    summary = pa.Table.from_pylist([
        {"checkpoint": c, "pass_at_1": p, "maj_at_k": p, "pass_at_k": min(1.0, 2 * p), "k": 4, "format_rate": f,
         "language_mix_rate": 0.0, "mean_length": 40.0, "greedy_accuracy": p, "params": 1_000_000, "problems": 12}
        for c, p, f in (("base", 0.0, 0.0), ("rl_zero", 0.95, 1.0), ("sft", 0.5, 0.98), ("rl_reasoning", 1.0, 1.0))])
    m = store.write("evaluate", "e" * 64, {}, {}, lambda out: pq.write_table(summary, out / "summary.parquet") or {},
                    code="v")
    record.stages["evaluate"].status, record.stages["evaluate"].path = "ran", str(store.path_for("evaluate", m.cache_key))
    record.stages["evaluate"].content_hash = m.content_hash
    runs.save(record)


def test_rl_curves_are_a_grid_of_the_metrics_practitioners_read(tmp_path):
    _fake_run(tmp_path)
    report = write_report(tmp_path, "r")
    titles = [t for t, _, _ in rl_panels({"rl_zero": {n: [(0, 1.0)] for n in (
        "eval/pass@1", "eval/format_rate", "completion_len_mean", "kl", "entropy", "clip_high")}})]
    assert titles == ["eval pass@1 (test split)", "eval format rate", "response length (tokens)", "KL to reference",
                      "entropy (nats/token)", "clip fraction"]
    w, h = Image.open(report.parent / "rl_curves.png").size
    assert w / h < 2.5  # a grid, not a 2310x374 strip
    w, h = Image.open(report.parent / "eval.png").size
    assert w / h < 3
    text = report.read_text()
    assert "![RL curves](rl_curves.png)" in text and "![evaluation](eval.png)" in text


def test_a_rerun_on_the_same_artifacts_reuses_the_plots_without_drawing(tmp_path, monkeypatch):
    import shutil

    from pipeline import report as report_module

    _fake_run(tmp_path)
    first = write_report(tmp_path, "r").parent
    record = RunStore(tmp_path).load("r")
    again = RunStore(tmp_path).create({}, STAGES, preset="micro", run_id="r2")  # a cached rerun: the same artifacts
    again.stages = record.stages
    RunStore(tmp_path).save(again)

    def refuse(*_a, **_k):
        raise AssertionError("drew a plot whose inputs have not changed")

    for name in ("_plot_rl", "_plot_eval"):  # (no scaling.parquet here: nothing to draw or cache)
        monkeypatch.setattr(report_module, name, refuse)
    second = write_report(tmp_path, "r2").parent
    for png in ("rl_curves.png", "eval.png"):
        assert (second / png).read_bytes() == (first / png).read_bytes()
    assert "![RL curves](rl_curves.png)" in (second / "report.md").read_text()

    again.stages["evaluate"].content_hash = "0" * 64  # another evaluate artifact: its plot is drawn anew
    RunStore(tmp_path).save(again)
    shutil.rmtree(second)
    with pytest.raises(AssertionError, match="drew a plot"):
        write_report(tmp_path, "r2")
