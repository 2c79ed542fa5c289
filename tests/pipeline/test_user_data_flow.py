"""The micro flow on a verl GSM8K-style Parquet directory and an open-r1-style JSONL, with only
`problems.source`, `problems.path` and `problems.schema` set."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from artifacts import RunStore
from pipeline.config import STAGES
from tests.pipeline.cli_helpers import cli
from tests.stages.test_problems_schemas import openr1_rows, write_jsonl, write_verl_dir

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run_micro_on(root, path, schema: str) -> dict:
    code, out = cli("run", "--preset", "micro", "--root", str(root), "--run-id", f"{schema}-1", "--json",
                    "--set", "problems.source=file", "--set", f"problems.path={path}",
                    "--set", f"problems.schema={schema}")
    assert code == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and list(summary["stages"]) == list(STAGES)
    return summary


@pytest.mark.slow  # a whole micro flow (12 min on this shared 2-core machine under load)
def test_micro_flow_on_a_verl_gsm8k_directory(tmp_path):
    data = write_verl_dir(tmp_path / "gsm8k", n_train=24, n_test=8)
    run_micro_on(tmp_path / "root", data, "verl")
    record = RunStore(tmp_path / "root").load("verl-1")
    assert record.stages["problems"].summary["rows_train"] == 24 and record.stages["problems"].summary["schema"] == "verl"
    rollouts = pq.read_table(record.stages["rl_zero"].path + "/rollouts.parquet")
    # the chat-message prompt was rendered with the stage's template, the verl instruction kept
    assert rollouts.column("prompt")[0].as_py().startswith("User: Tom has")
    assert 'final answer after "####"' in rollouts.column("prompt")[0].as_py()


@pytest.mark.slow  # a second whole micro flow
def test_micro_flow_on_an_open_r1_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "numina.jsonl", openr1_rows(30))
    run_micro_on(tmp_path / "root", path, "openr1")
    record = RunStore(tmp_path / "root").load("openr1-1")
    assert record.stages["problems"].summary["schema"] == "openr1"
    assert record.stages["evaluate"].status == "ran"
