"""rejection_sampling on tiny data: correct-only SFT rows after R1's filters, dedupe, valid pairs."""
from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lm.checkpoint import load_tokenizer
from lm.value import load_value_model
from rewards import accuracy_reward
from stages import filters, orm, rejection_sampling
from stages.context import StageContext
from tests.stages.sampling_fakes import ScriptedSampler, save_tiny_checkpoint, tiny_tokenizer, trace, write_problems

Q1, Q2, Q3 = "What is 47 + 85?", "What is 9 * 3?", "What is 10 - 4?"
GOOD1 = trace("7+5=12 carry 1: 2. 4+8+1=13 carry 1: 32. so 132.", "132")
GOOD1_SPACED = trace("7+5=12  carry 1 : 2. 4+8+1=13 CARRY 1: 32 . so 132.", "132")  # near-identical to GOOD1
GOOD1_OTHER = trace("5+7=12 carry 1: 2. 8+4+1=13 carry 1: 32. so 132.", "132")
WRONG1 = trace("7+5=12 carry 1: 2. 4+8=12: 122. so 122.", "122")
WRONG1_AGAIN = trace("7+5=12 carry 1: 2. 4+8=12: 122. so 122.", "122")  # a duplicate rejected
WRONG1_OTHER = trace("7+5=11 carry 1: 1. 4+8+1=13: 131. so 131.", "131")
FENCED2 = trace("```9*3=27```. so 27.", "27")
LONG2 = trace(" ".join(f"{i}+1={i + 1}." for i in range(150)) + " 9*3=27. so 27.", "27")  # one 1400-char paragraph
GOOD2 = trace("9*3=27: 27. so 27.", "27")
WRONG3 = trace("10-4=5: 5. so 5.", "5")

SCRIPT = {
    Q1: [GOOD1, WRONG1, GOOD1_SPACED, WRONG1_AGAIN, GOOD1_OTHER, WRONG1_OTHER],
    Q2: [FENCED2, LONG2, GOOD2, GOOD2, GOOD2, GOOD2],
    Q3: [WRONG3] * 6,
}


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rs")
    tok = tiny_tokenizer()
    save_tiny_checkpoint(root / "rl_reasoning" / "checkpoint", tok)
    write_problems(root / "problems", [
        {"id": "p1", "prompt": Q1, "answer": "132", "split": "train"},
        {"id": "p2", "prompt": Q2, "answer": "27", "split": "train"},
        {"id": "p3", "prompt": Q3, "answer": "6", "split": "train"},
    ])
    return {"rl_reasoning": root / "rl_reasoning", "problems": root / "problems"}


def _run(inputs: dict[str, Path], out: Path, **cfg) -> tuple[dict, ScriptedSampler]:
    tok = load_tokenizer(inputs["rl_reasoning"] / "checkpoint")
    sampler = ScriptedSampler(tok, SCRIPT)
    config = rejection_sampling.Config(**{"samples_per_prompt": 6, "keep_per_prompt": 3, "max_prompts": None,
                                          "batch_size": 5, **cfg})
    out.mkdir(parents=True, exist_ok=True)
    summary = rejection_sampling.run(config, inputs, out, StageContext(seed=1, progress=lambda it, **_: it),
                                     sampler_factory=sampler.factory())
    return summary, sampler


def test_keeps_correct_clean_deduplicated_samples(run_inputs, tmp_path) -> None:
    summary, _ = _run(run_inputs, tmp_path)
    kept = pq.read_table(tmp_path / "reasoning_sft.parquet").to_pylist()
    # p1: GOOD1 kept, GOOD1_SPACED a near-duplicate of it, GOOD1_OTHER kept; the WRONG ones dropped
    # p2: FENCED2 -> code_fence, LONG2 -> paragraph (> 1200 chars), GOOD2 kept, 3 exact copies -> duplicate
    # p3: nothing correct
    assert [(r["problem_id"], r["sample"]) for r in kept] == [("p1", 0), ("p1", 4), ("p2", 2)]
    assert accuracy_reward([r["completion"] for r in kept], answer=[r["answer"] for r in kept]) == [1.0] * 3
    assert summary["dropped_duplicate"] == 4 and summary["dropped_code_fence"] == 1
    assert summary["dropped_paragraph"] == 1 and summary["dropped_correct"] == 9
    assert summary["kept"] == 3 and summary["candidates"] == 18
    assert summary["kept"] + sum(summary[f"dropped_{r}"] for r in filters.DROP_REASONS) == summary["candidates"]


def test_pass_rate_statistics(run_inputs, tmp_path) -> None:
    summary, _ = _run(run_inputs, tmp_path)
    # raw pass rates per prompt: p1 3/6, p2 6/6 (fenced and long ones are correct too), p3 0/6
    assert summary["pass_rate_mean"] == pytest.approx((0.5 + 1.0 + 0.0) / 3, abs=1e-6)
    assert summary["pass_rate_median"] == 0.5
    assert summary["pass_rate_min"] == 0.0 and summary["pass_rate_max"] == 1.0
    assert summary["share_no_correct"] == pytest.approx(1 / 3, abs=1e-6)
    assert summary["share_all_correct"] == pytest.approx(1 / 3, abs=1e-6)


def test_preference_pairs_are_valid(run_inputs, tmp_path) -> None:
    summary, _ = _run(run_inputs, tmp_path, pairs_per_prompt=2)
    pairs = pq.read_table(tmp_path / "preference_pairs.parquet").to_pylist()
    # p1: chosen GOOD1, GOOD1_OTHER; rejected WRONG1, WRONG1_OTHER (WRONG1_AGAIN is a duplicate of WRONG1)
    # p2: no incorrect sample; p3: no correct one -> no pairs
    assert [(p["chosen_sample"], p["rejected_sample"]) for p in pairs] == [(0, 1), (4, 5)]
    assert summary["pairs"] == 2
    for p in pairs:
        assert p["problem_id"] == "p1" and p["chosen"] != p["rejected"]
        assert accuracy_reward([p["chosen"], p["rejected"]], answer=[p["answer"]] * 2) == [1.0, 0.0]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        rejection_sampling.Config(n_samples=4)
    with pytest.raises(ValueError, match="unknown checks"):
        rejection_sampling.Config(checks=["correct", "short"])


def test_orm_trains_on_every_candidate_and_is_saved(run_inputs, tmp_path) -> None:
    summary, _ = _run(run_inputs, tmp_path, orm={"enabled": True, "steps": 3, "batch_size": 6, "holdout": 0.34,
                                                  "autocast": False})
    # every candidate is a training row, filtered or not: 18, of which 9 correct (p1 3/6, p2 6/6, p3 0/6)
    assert summary["orm_candidates"] == 18 and summary["orm_positive_rate"] == 0.5
    assert summary["orm_steps"] == 3 and math.isfinite(summary["orm_final_loss"])
    # one prompt's 6 candidates held out (0.34 of 18 -> 6); its accuracy is a share of 6
    assert summary["orm_heldout_accuracy"] * 6 == pytest.approx(round(summary["orm_heldout_accuracy"] * 6))
    rows = pq.read_table(tmp_path / "orm_metrics.parquet").to_pylist()
    assert [r["step"] for r in rows if r["name"] == "loss"] == [1, 2, 3]
    assert {r["name"] for r in rows if r["step"] in (0, 3)} >= {"eval/loss", "eval/accuracy", "eval/auc"}
    scorer = orm.find(tmp_path, "cpu")
    probs = scorer.probabilities([Q1, Q3], [GOOD1, WRONG3])
    assert all(0.0 < p < 1.0 for p in probs)
    model, _, meta = load_value_model(tmp_path / orm.DIR)
    assert meta["kind"] == "orm" and meta["steps"] == 3
    assert model.head.weight.abs().sum() > 0  # trained away from the zero initialisation


def test_orm_is_off_by_default(run_inputs, tmp_path) -> None:
    summary, _ = _run(run_inputs, tmp_path)
    assert not (tmp_path / orm.DIR).exists() and not (tmp_path / "orm_metrics.parquet").exists()
    assert not any(k.startswith("orm_") for k in summary)
    with pytest.raises(ValueError, match="orm"):
        rejection_sampling.Config(orm={"enabled": True, "stepz": 3})
