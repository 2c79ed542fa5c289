"""cold_start on tiny data: sampled candidates through the filter chain, and user files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm.checkpoint import load_tokenizer
from stages import cold_start, filters
from stages.context import StageContext
from tests.stages.sampling_fakes import ScriptedSampler, save_tiny_checkpoint, tiny_tokenizer, trace, write_problems

Q1, Q2, Q3 = "What is 47 + 85?", "What is 9 * 3?", "What is 10 - 4?"
GOOD1 = trace("7+5=12 carry 1: 2. 4+8+1=13 carry 1: 32. so 132.", "132")
GOOD1B = trace("5+7=12 carry 1: 2. 8+4+1=13 carry 1: 32. so 132.", "132")
GOOD1C = trace("7+5=12 carry 1: 2. 4+8+1=13: 132. so 132.", "132")
WRONG1 = trace("7+5=12 carry 1: 2. 4+8=12: 122. so 122.", "122")
MIXED1 = trace("7+5=12 进位 1: 2. 4+8+1=13 进位 1: 32. 所以 132.", "132")
LOOP1 = trace("so 1. so 1. so 1. so 1. so 1. so 1. so 1. so 132.", "132")
UNTAGGED2 = " 9*3=27. so 27. The answer is 27."
GOOD2 = trace("9*3=27: 27. so 27.", "27")
CUT3 = (" <think> 10-4=6: 6. so", "length")
WRONG3 = trace("10-4=5: 5. so 5.", "5")

SCRIPT = {
    Q1: [WRONG1, GOOD1, MIXED1, GOOD1B, LOOP1, GOOD1C],  # 3 pass all filters; cap 2 -> 1 over_cap
    Q2: [UNTAGGED2, GOOD2, GOOD2, UNTAGGED2, GOOD2, GOOD2],  # format fails twice; 4 good, cap -> 2 over_cap
    Q3: [CUT3, WRONG3, CUT3, WRONG3, CUT3, WRONG3],  # nothing survives
}


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cold")
    tok = tiny_tokenizer()
    save_tiny_checkpoint(root / "rl_zero" / "checkpoint", tok)
    write_problems(root / "problems", [
        {"id": "p1", "prompt": Q1, "answer": "132", "split": "train"},
        {"id": "p2", "prompt": Q2, "answer": "27", "split": "train"},
        {"id": "p3", "prompt": Q3, "answer": "6", "split": "train"},
        {"id": "t1", "prompt": "What is 1 + 1?", "answer": "2", "split": "test"},
    ])
    return {"rl_zero": root / "rl_zero", "problems": root / "problems"}


def _run(cfg: cold_start.Config, inputs: dict[str, Path], out: Path, sampler: ScriptedSampler | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"sampler_factory": sampler.factory()} if sampler is not None else {}
    return cold_start.run(cfg, inputs, out, StageContext(seed=0, progress=lambda it, **_: it), **kwargs)


def test_keeps_only_rows_passing_every_filter_and_counts_add_up(run_inputs, tmp_path) -> None:

    tok = load_tokenizer(run_inputs["rl_zero"] / "checkpoint")
    sampler = ScriptedSampler(tok, SCRIPT)
    cfg = cold_start.Config(samples_per_prompt=6, keep_per_prompt=2, batch_size=4, max_prompts=None)
    summary = _run(cfg, run_inputs, tmp_path, sampler)

    kept = pq.read_table(tmp_path / "cold_start.parquet").to_pylist()
    cands = pq.read_table(tmp_path / "candidates.parquet").to_pylist()
    assert len(cands) == 18 and summary["candidates"] == 18 and summary["prompts"] == 3
    # Q1: WRONG1 -> correct, MIXED1 -> language, LOOP1 -> repetition; GOOD1, GOOD1B kept; GOOD1C over the cap
    # Q2: UNTAGGED2 x2 -> format; the four GOOD2 survive every check; 2 kept, 2 over the cap
    # Q3: CUT3 x3 -> length (cut off, no answer, but "correct" comes first: no answer is wrong) ...
    assert [(r["problem_id"], r["sample"]) for r in kept] == [("p1", 1), ("p1", 3), ("p2", 1), ("p2", 2)]
    assert [r["completion_text"] for r in kept] == [GOOD1, GOOD1B, GOOD2, GOOD2]
    for r in kept:  # a kept row passed every check it applies; the others are recorded as not applied
        assert all(r[f"pass_{c}"] is True for c in cfg.checks)
        assert r["pass_paragraph"] is None and r["pass_code_fence"] is None
        assert r["accuracy"] == 1.0 and r["origin"] == "rl_zero" and r["n_tokens"] > 0
    reasons = {(r["problem_id"], r["sample"]): r["drop_reason"] for r in cands}
    assert reasons[("p1", 0)] == "correct" and reasons[("p1", 2)] == "language"
    assert reasons[("p1", 4)] == "repetition" and reasons[("p1", 5)] == "over_cap"
    assert reasons[("p2", 0)] == "format" and reasons[("p2", 4)] == "over_cap"
    assert reasons[("p3", 0)] == "correct" and reasons[("p3", 1)] == "correct"

    dropped = {k: v for k, v in summary.items() if k.startswith("dropped_") and k != "dropped_empty"}
    assert set(dropped) == {f"dropped_{r}" for r in filters.DROP_REASONS}
    assert summary["kept"] == 4 and summary["kept"] + sum(dropped.values()) == summary["candidates"]
    assert summary["dropped_over_cap"] == 3 and summary["dropped_correct"] == 7
    assert summary["dropped_format"] == 2 and summary["dropped_language"] == 1
    assert summary["dropped_repetition"] == 1 and summary["kept_prompts"] == 2
    # every candidate row is either kept or has exactly one reason, consistent with the summary
    assert sum(r["drop_reason"] is None for r in cands) == summary["kept"]
    assert sampler.calls and all(rows <= 4 for rows, _, _ in sampler.calls)  # batched by batch_size


def test_sampling_is_deterministic_and_seeded(run_inputs, tmp_path) -> None:

    tok = load_tokenizer(run_inputs["rl_zero"] / "checkpoint")
    cfg = cold_start.Config(samples_per_prompt=2, max_prompts=2, batch_size=3)
    a, b = ScriptedSampler(tok, SCRIPT), ScriptedSampler(tok, SCRIPT)
    sa = _run(cfg, run_inputs, tmp_path / "a", a)
    sb = _run(cfg, run_inputs, tmp_path / "b", b)
    assert sa == sb and a.calls == b.calls and sa["prompts"] == 2  # same subset, same batches, same seeds
    assert (pq.read_table(tmp_path / "a" / "candidates.parquet").equals(
        pq.read_table(tmp_path / "b" / "candidates.parquet")))


def test_readable_rewrite() -> None:
    # the summary sentence is added when the reasoning does not end with the answer
    assert cold_start.readable("<think>7+5=12.\n  4+8+1=13</think>\n<answer>132</answer>") == \
        " <think> 7+5=12. 4+8+1=13. so 132. </think> <answer> 132 </answer>"
    assert cold_start.readable(GOOD1) == GOOD1  # already readable
    assert cold_start.readable(UNTAGGED2) is None
    assert cold_start.readable(" <think> x </think>") is None


def test_rewrite_keeps_rows_correct_and_well_formed(run_inputs, tmp_path) -> None:
    from rewards import accuracy_reward, format_reward

    tok = load_tokenizer(run_inputs["rl_zero"] / "checkpoint")
    messy = "<think>7+5=12 carry 1: 2.\n4+8+1=13 carry 1: 32</think> <answer>132</answer>"
    sampler = ScriptedSampler(tok, {Q1: [messy], Q2: [GOOD2], Q3: [WRONG3]})
    cfg = cold_start.Config(samples_per_prompt=1, rewrite="readable", max_prompts=None)
    summary = _run(cfg, run_inputs, tmp_path, sampler)
    kept = pq.read_table(tmp_path / "cold_start.parquet").to_pylist()
    assert summary["rewritten"] == 1 and summary["kept"] == 2
    row = next(r for r in kept if r["problem_id"] == "p1")
    assert row["rewritten"] and row["original_completion"] == messy
    assert row["completion_text"] == " <think> 7+5=12 carry 1: 2. 4+8+1=13 carry 1: 32. so 132. </think> <answer> 132 </answer>"
    assert accuracy_reward([row["completion_text"]], answer=["132"]) == [1.0]
    assert format_reward([row["completion_text"]]) == [1.0]


# ----------------------------------------------------------------------------------- user files


def _file_cfg(path: Path, **kw) -> cold_start.Config:
    return cold_start.Config(source="file", path=str(path), **kw)


def test_user_jsonl_is_filtered_with_answers_looked_up_by_prompt(run_inputs, tmp_path) -> None:
    path = tmp_path / "cs.jsonl"
    lines = [
        {"prompt": Q1, "completion": GOOD1},                   # answer from problems.parquet: kept
        {"prompt": Q1, "completion": WRONG1},                  # wrong: dropped
        {"prompt": "What is 2 + 2?", "completion": trace("2+2=4: 4. so 4.", "4"), "answer": "4"},
        {"prompt": "", "completion": GOOD2},                   # empty prompt: skipped and counted
        {"prompt": Q2, "completion": "   "},                   # empty completion: skipped and counted
    ]
    path.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n")
    summary = _run(_file_cfg(path), run_inputs, tmp_path / "out")
    kept = pq.read_table(tmp_path / "out" / "cold_start.parquet").to_pylist()
    assert summary["dropped_empty"] == 2 and summary["candidates"] == 3 and summary["kept"] == 2
    assert summary["dropped_correct"] == 1
    assert [r["problem_id"] for r in kept][0] == "p1" and all(r["origin"] == "file" for r in kept)


def test_user_parquet_without_answers_leaves_correctness_unchecked(run_inputs, tmp_path) -> None:
    path = tmp_path / "cs.parquet"
    pq.write_table(pa.table({"prompt": ["Unknown question?"], "completion": [trace("think.", "5")]}), path)
    summary = _run(_file_cfg(path), run_inputs, tmp_path / "out")
    row = pq.read_table(tmp_path / "out" / "cold_start.parquet").to_pylist()[0]
    assert summary["kept"] == 1 and row["pass_correct"] is None and row["answer"] is None


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", b"", "is empty"),
    ("blank.jsonl", b"\n\n", "has no rows"),
    ("latin1.jsonl", '{"prompt": "caf\u00e9", "completion": "x"}'.encode("latin-1"), "line 1: not UTF-8"),
    ("nocol.jsonl", b'{"question": "q", "completion": "c"}\n', "missing column(s) ['prompt']; it has: 'question', 'completion'"),
    ("bad.jsonl", b'{"prompt": \n', "line 1: not valid JSON"),
    ("cs.csv", b"prompt,completion\nq,c\n", "unsupported extension"),
])
def test_bad_user_files_give_clear_errors(run_inputs, tmp_path, name, content, message) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        _run(_file_cfg(path), run_inputs, tmp_path / "out")


def test_user_parquet_with_invalid_utf8_or_missing_column(run_inputs, tmp_path) -> None:
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": pa.array([b"ok", b"caf\xe9"], pa.binary()),
                             "completion": pa.array([b"x", b"y"], pa.binary())}), bad)
    with pytest.raises(ValueError, match=r"row 2: column 'prompt' is not UTF-8"):
        _run(_file_cfg(bad), run_inputs, tmp_path / "o1")
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "response": ["c"]}), nocol)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['completion'\]"):
        _run(_file_cfg(nocol), run_inputs, tmp_path / "o2")


def test_config_rejects_unknown_keys_and_checks() -> None:
    with pytest.raises(ValueError):
        cold_start.Config(samples=3)
    with pytest.raises(ValueError, match="unknown checks"):
        cold_start.Config(checks=["correct", "pretty"])
    with pytest.raises(ValueError, match="needs path"):
        cold_start.Config(source="file")
