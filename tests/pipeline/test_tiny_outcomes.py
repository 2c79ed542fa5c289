"""The embedded default end to end: `r1flow run` on the tiny preset reaches the R1 recipe's effects
(issue 8). Slow (about 10 minutes a run on 2 CPU cores): `python -m pytest -m slow tests/pipeline/test_tiny_outcomes.py`.
"""
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from artifacts import verify
from pipeline.config import STAGES
from tests.pipeline.cli_helpers import cli_json


def run_tiny(root: Path) -> dict:
    return cli_json("run", "--preset", "tiny", "--root", str(root), "--json")


def summary_by_checkpoint(run: dict) -> dict[str, dict]:
    path = Path(run["stages"]["evaluate"]["path"]) / "summary.parquet"
    return {r["checkpoint"]: r for r in pq.read_table(path).to_pylist()}


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("tiny-a"))


def assert_recipe_effects(s: dict[str, dict]) -> None:
    """The R1 effects the tiny preset must show, on evaluate's summary by checkpoint (also applied by
    hand to a timed run: `assert_recipe_effects(summary_by_checkpoint(run_json))`)."""
    base, zero, reasoning = s["base"], s["rl_zero"], s["rl_reasoning"]
    student, baseline = s["student:tiny-student"], s["baseline:tiny-student"]
    # R1-Zero: pure RL from the base removes two thirds of its pass@1 errors and settles the format.
    # (Stated in errors, not points: trained in fp32 on a CPU without native bf16 the base is
    # stronger, 86.6% against 76.4% under bf16 autocast, and the lift was 10.5 points, 87% -> 97%.)
    assert 1 - zero["pass_at_1"] <= (1 - base["pass_at_1"]) / 3
    assert zero["format_rate"] >= 0.90
    # the language-consistency reward halves the mixing at (almost) no cost in accuracy
    assert reasoning["language_mix_rate"] <= zero["language_mix_rate"] / 2
    assert reasoning["pass_at_1"] >= zero["pass_at_1"] - 0.02
    # distillation: a student a third of the size keeps 80% of the teacher and beats corpus-only
    assert student["params"] <= reasoning["params"] / 3
    assert student["pass_at_1"] >= 0.8 * reasoning["pass_at_1"]
    assert student["pass_at_1"] > baseline["pass_at_1"]


@pytest.mark.slow
def test_tiny_preset_reaches_the_recipes_effects(tiny_run):
    run = tiny_run  # its wall time is a bench figure (the note quotes it), never asserted here
    assert run["status"] == "succeeded"
    for name in STAGES:
        verify(run["stages"][name]["path"])
    assert_recipe_effects(summary_by_checkpoint(run))


@pytest.mark.slow
def test_same_seed_gives_the_same_eval_table(tiny_run, tmp_path):
    first = tiny_run
    second = run_tiny(tmp_path)
    tables = [pq.read_table(Path(r["stages"]["evaluate"]["path"]) / "eval.parquet") for r in (first, second)]
    assert tables[0].equals(tables[1])
