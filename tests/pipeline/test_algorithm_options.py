"""The objective options of issue #17 through the CLI, on a copy of the session's micro run.

Each option reruns only the stage it configures (`r1flow stage NAME --set ...`), so the test stays
fast; the whole flow with each option is `test_micro_run_with_each_option` (slow).
"""
from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from artifacts import RunStore
from tests.pipeline.cli_helpers import cli, cli_json

pytestmark = pytest.mark.usefixtures("prefect_harness")

RL_ZERO_OPTIONS = [
    ('rl_zero.policy_loss="gspo"',),
    ('rl_zero.policy_loss="cispo"',),
    ('rl_zero.advantage="rloo"',),
    ('rl_zero.advantage="reinforce_pp"',),
    ('rl_zero.advantage="gae"',),
    ("rl_zero.tis_cap=2.0", "rl_zero.mu=2"),
]
FLOW_OPTIONS = RL_ZERO_OPTIONS + [("dpo.enabled=true", 'distill.mode="on_policy"'),
                                  ("rejection_sampling.orm.enabled=true",)]


@pytest.mark.parametrize("sets", RL_ZERO_OPTIONS, ids=lambda s: ",".join(x.replace('"', '') for x in s))
def test_rl_zero_option_reruns_the_stage(micro_copy, sets) -> None:
    root, run_id = micro_copy
    args = [a for s in sets for a in ("--set", s)]
    code, out = cli("stage", "rl_zero", "--run", run_id, "--root", str(root), *args)
    assert code == 0, out
    entry = RunStore(root).load(run_id).stages["rl_zero"]
    assert entry.status == "ran"
    rows = pq.read_table(f"{entry.path}/metrics.parquet").to_pylist()
    train = [r for r in rows if r["step"] > 0 and not r["name"].startswith("eval/")]
    assert train and all(math.isfinite(r["value"]) for r in train)
    names = {r["name"] for r in train}
    assert {"clip_frac", "entropy"} <= names
    if any("tis_cap" in s for s in sets):
        assert {"tis_weight", "tis_capped"} <= names


def test_dpo_and_on_policy_distill_then_evaluate(micro_copy) -> None:
    root, run_id = micro_copy
    code, out = cli("stage", "dpo", "--run", run_id, "--root", str(root), "--set", "dpo.enabled=true")
    assert code == 0, out
    code, out = cli("stage", "distill", "--run", run_id, "--root", str(root), "--set", 'distill.mode="on_policy"')
    assert code == 0, out
    record = RunStore(root).load(run_id)
    assert record.stages["dpo"].summary["enabled"] is True
    assert record.stages["distill"].summary["mode"] == "on_policy"
    assert record.stages["evaluate"].status == "stale"
    code, out = cli("stage", "evaluate", "--run", run_id, "--root", str(root))
    assert code == 0, out
    summary = RunStore(root).load(run_id).stages["evaluate"].summary
    assert "dpo" in summary and 0.0 <= summary["dpo"]["pass@1"] <= 1.0


def test_orm_then_evaluate_reports_orm_voting(micro_copy) -> None:
    root, run_id = micro_copy
    code, out = cli("stage", "rejection_sampling", "--run", run_id, "--root", str(root),
                    "--set", "rejection_sampling.orm.enabled=true")
    assert code == 0, out
    rs = RunStore(root).load(run_id).stages["rejection_sampling"]
    assert rs.summary["orm_steps"] == 4 and math.isfinite(rs.summary["orm_final_loss"])
    code, out = cli("stage", "evaluate", "--run", run_id, "--root", str(root))
    assert code == 0, out
    entry = RunStore(root).load(run_id).stages["evaluate"]
    for name in ("base", "rl_reasoning", "student:micro"):
        m = entry.summary[name]
        assert 0.0 <= m["orm_weighted_maj@k"] <= 1.0 and 0.0 <= m["orm_best_of_k"] <= 1.0
    rows = pq.read_table(f"{entry.path}/eval.parquet").to_pylist()
    assert all(0.0 < r["orm_score"] < 1.0 for r in rows)
    methods = {r["method"] for r in pq.read_table(f"{entry.path}/scaling.parquet").to_pylist()}
    assert {"orm_weighted_maj", "orm_best_of"} <= methods
    code, out = cli("report", run_id, "--root", str(root))
    assert code == 0, out
    md = (root / "runs" / run_id / "report" / "report.md").read_text()
    assert "| orm_weighted_maj@k | orm_best_of_k |" in md and "by the outcome reward model" in md


def test_unknown_policy_loss_is_a_clear_error(micro_copy, capsys) -> None:
    root, run_id = micro_copy
    code, _ = cli("stage", "rl_zero", "--run", run_id, "--root", str(root), "--set", 'rl_zero.policy_loss="ppo2"')
    assert code == 2
    err = capsys.readouterr().err
    assert "policy_loss" in err and "gspo" in err


@pytest.mark.slow
@pytest.mark.parametrize("sets", FLOW_OPTIONS, ids=lambda s: ",".join(x.replace('"', '') for x in s))
def test_micro_run_with_each_option(tmp_path_factory, sets) -> None:
    root = tmp_path_factory.getbasetemp() / "options-root"  # shared: problems and base are reused
    args = [a for s in sets for a in ("--set", s)]
    summary = cli_json("run", "--preset", "micro", "--root", str(root), *args, "--json")
    assert summary["status"] == "succeeded"
    if "dpo.enabled=true" in sets:
        assert "dpo" in summary["stages"]["evaluate"]["summary"]
    if "rejection_sampling.orm.enabled=true" in sets:
        assert summary["stages"]["evaluate"]["summary"]["rl_reasoning"]["orm_best_of_k"] is not None
