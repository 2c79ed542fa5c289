"""evaluate: metrics per checkpoint against hand-computed values, and a real tiny model end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lm.checkpoint import load_checkpoint, load_tokenizer
from lm.tokenizer import Tokenizer
from stages import evaluate
from stages.context import StageContext
from tests.stages.sampling_fakes import ScriptedSampler, save_tiny_checkpoint, tiny_tokenizer, trace, write_problems

T1, T2 = "What is 1 + 1?", "What is 2 * 3?"
R1 = trace("1+1=2: 2. so 2.", "2")
W1 = trace("1+1=3: 3. so 3.", "3")
MIX1 = trace("1+1=2: 2. 所以 然后 先 约分 2.", "2")  # correct, but the think text is Chinese
UNTAGGED1 = " 1+1=2. The answer is 2."                 # correct, no format
R2 = trace("2*3=6: 6. so 6.", "6")
R2_DEC = trace("2*3=6: 6. so 6.0.", "6.0")             # votes with "6" (same value)
W2 = trace("2*3=5: 5. so 5.", "5")

# checkpoint name -> (model dim that identifies it, sampled script, greedy script)
SCRIPTS = {
    "base": (16, {T1: [UNTAGGED1, UNTAGGED1, W1, W1], T2: [W2]}, {T1: W1, T2: W2}),
    "rl_zero": (24, {T1: [R1, W1, MIX1, W1], T2: [W2, R2, R2_DEC, W2]}, {T1: R1, T2: W2}),
    "sft": (32, {T1: [R1], T2: [R2]}, {}),
    "rl_reasoning": (40, {T1: [R1], T2: [R2]}, {}),
    "student:s1": (48, {T1: [R1], T2: [R2]}, {}),
    "baseline:s1": (56, {T1: [R1, W1], T2: [W2]}, {}),
}
CONTRACT_KEYS = {"pass@1", "maj@k", "pass@k", "k", "format_rate", "language_mix_rate", "mean_length",
                 "greedy_accuracy", "params", "weighted_maj@k", "best_of_k", "orm_weighted_maj@k", "orm_best_of_k"}


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    tok = tiny_tokenizer()
    dirs = {"base": root / "base" / "checkpoint", "rl_zero": root / "rl_zero" / "checkpoint",
            "sft": root / "sft" / "checkpoint", "rl_reasoning": root / "rl_reasoning" / "checkpoint",
            "student:s1": root / "distill" / "students" / "s1",                 # a checkpoint dir itself
            "baseline:s1": root / "distill" / "baselines" / "s1" / "checkpoint"}  # or one level down
    for name, (dim, _, _) in SCRIPTS.items():
        save_tiny_checkpoint(dirs[name], tok, dim=dim)
    write_problems(root / "problems", [
        {"id": "t1", "prompt": T1, "answer": "2", "split": "test"},
        {"id": "t2", "prompt": T2, "answer": "6", "split": "test"},
        {"id": "p1", "prompt": "What is 5 + 5?", "answer": "10", "split": "train"},
    ])
    return {s: root / s for s in ("problems", "base", "rl_zero", "sft", "rl_reasoning", "distill")}


def _scripted_factory(tok: Tokenizer):
    samplers = {dim: ScriptedSampler(tok, script, greedy=greedy) for dim, script, greedy in SCRIPTS.values()}
    return lambda model, _tok, _bs: samplers[model.config.dim]


def _ctx() -> StageContext:
    return StageContext(seed=0, progress=lambda it, **_: it)


def test_metrics_per_checkpoint_match_hand_computed_values(run_inputs, tmp_path) -> None:
    tok = load_tokenizer(run_inputs["base"] / "checkpoint")
    summary = evaluate.run(evaluate.Config(k=4, batch_size=3), run_inputs, tmp_path, _ctx(),
                           sampler_factory=_scripted_factory(tok))
    assert list(summary) == [*SCRIPTS, "best_pass@1"]
    for name in SCRIPTS:
        assert set(summary[name]) == CONTRACT_KEYS and summary[name]["k"] == 4

    z = summary["rl_zero"]
    # t1: R1 W1 MIX1 W1 -> correct 1 0 1 0; answers 2 3 2 3: a 2-2 tie, "2" came first -> right
    # t2: W2 R2 R2_DEC W2 -> correct 0 1 1 0; answers 5 6 6 5: a 2-2 tie, "5" came first -> wrong
    assert z["pass@1"] == pytest.approx((2 / 4 + 2 / 4) / 2)  # 0.5
    assert z["maj@k"] == pytest.approx((1 + 0) / 2)           # 0.5
    assert z["pass@k"] == pytest.approx(1.0)                  # n=4, c=2, k=4: n-c < k -> 1 for both
    assert z["format_rate"] == 1.0
    assert z["language_mix_rate"] == pytest.approx(1 / 8)     # MIX1 only
    assert z["greedy_accuracy"] == pytest.approx(0.5)         # t1 R1 right, t2 W2 wrong
    # the scripted sampler reports log-prob 0 for every token: equal weights, so the weighted vote
    # is the plain one, and best-of-k by log-prob picks the first sample (t1 R1 right, t2 W2 wrong)
    assert z["weighted_maj@k"] == pytest.approx(0.5) and z["best_of_k"] == pytest.approx(0.5)
    assert z["orm_weighted_maj@k"] is None and z["orm_best_of_k"] is None  # the run has no ORM

    b = summary["base"]
    # t1: UNTAGGED1 x2 (correct, bad format) W1 x2 -> 2/4; t2: W2 x4 -> 0/4
    assert b["pass@1"] == pytest.approx(0.25)
    assert b["maj@k"] == pytest.approx(0.5)       # t1 tie "2" vs "3", "2" first -> right; t2 wrong
    assert b["pass@k"] == pytest.approx(0.5)      # t1 c=2 -> 1; t2 c=0 -> 0
    assert b["format_rate"] == pytest.approx(6 / 8)
    assert b["language_mix_rate"] == 0.0 and b["greedy_accuracy"] == 0.0

    bl = summary["baseline:s1"]
    # t1: R1 W1 R1 W1 -> 1/2, t2: 0 -> pass@1 0.25; pass@4 (t1 c=2 -> 1) -> 0.5
    assert bl["pass@1"] == pytest.approx(0.25) and bl["pass@k"] == pytest.approx(0.5)
    assert summary["sft"]["pass@1"] == 1.0 and summary["student:s1"]["greedy_accuracy"] == 1.0
    assert summary["best_pass@1"] == 1.0

    rows = pq.read_table(tmp_path / "eval.parquet").to_pylist()
    assert len(rows) == 6 * (2 * 4 + 2)
    table = {r["checkpoint"]: r for r in pq.read_table(tmp_path / "summary.parquet").to_pylist()}
    for name, m in summary.items():
        if name == "best_pass@1":
            continue
        sampled = [r for r in rows if r["checkpoint"] == name and not r["greedy"]]
        assert m["mean_length"] == pytest.approx(np.mean([r["length"] for r in sampled]), abs=1e-6)
        assert table[name]["pass_at_1"] == pytest.approx(m["pass@1"]) and table[name]["problems"] == 2
        assert table[name]["params"] == m["params"] > 0
    assert all(r["logprob_mean"] == 0.0 for r in rows)
    scaling = pq.read_table(tmp_path / "scaling.parquet").to_pylist()
    assert len(scaling) == 6 * 3 * 4  # checkpoints x k in (1, 2, 4) x methods
    zs = {(r["k"], r["method"]): r for r in scaling if r["checkpoint"] == "rl_zero"}
    # k = 1: every method is the mean correctness; k = 4: the summary's maj@k and pass@k
    assert {zs[(1, m)]["accuracy"] for m in ("maj", "weighted_maj", "best_of", "pass")} == {0.5}
    assert zs[(4, "maj")]["accuracy"] == z["maj@k"] and zs[(4, "pass")]["accuracy"] == z["pass@k"]
    assert zs[(2, "maj")]["tokens_per_problem"] == pytest.approx(2 * z["mean_length"])
    mix_row = next(r for r in rows if r["checkpoint"] == "rl_zero" and r["completion"] == MIX1)
    assert mix_row["language_mixed"] and mix_row["correct"] and mix_row["predicted"] == "2"
    dec_row = next(r for r in rows if r["completion"] == R2_DEC)
    assert dec_row["predicted"] == "6" and dec_row["correct"]


class FakeOrm:
    """Stands in for `stages.orm.OutcomeRewardModel`: a fixed P(correct) per completion text."""

    PROBS = {R1: 0.9, W1: 0.2, MIX1: 0.3, W2: 0.5, R2: 0.45, R2_DEC: 0.7}

    def __init__(self) -> None:
        self.questions: set = set()

    def probabilities(self, questions, completions) -> list[float]:
        self.questions.update(questions)
        return [self.PROBS.get(c, 0.5) for c in completions]


def test_orm_scores_weight_the_votes_and_pick_the_best(run_inputs, tmp_path, monkeypatch) -> None:
    fake = FakeOrm()
    monkeypatch.setattr(evaluate.orm, "find", lambda artifact, device: fake if artifact is not None else None)
    tok = load_tokenizer(run_inputs["base"] / "checkpoint")
    inputs = {**run_inputs, "rejection_sampling": tmp_path / "rs"}
    summary = evaluate.run(evaluate.Config(k=4, batch_size=3), inputs, tmp_path / "out", _ctx(),
                           sampler_factory=_scripted_factory(tok))
    assert fake.questions == {T1, T2}
    z = summary["rl_zero"]
    # t1: R1 W1 MIX1 W1, answers 2 3 2 3, ORM 0.9 0.2 0.3 0.2: "2" 1.2 vs "3" 0.4 -> right;
    #     best-of: R1 (0.9) right
    # t2: W2 R2 R2_DEC W2, answers 5 6 6 5, ORM 0.5 0.45 0.7 0.5: "6" 1.15 vs "5" 1.0 -> right
    #     (the plain vote's 2-2 tie went to "5": wrong); best-of: R2_DEC (0.7) right
    assert z["maj@k"] == pytest.approx(0.5)
    assert z["orm_weighted_maj@k"] == pytest.approx(1.0) and z["orm_best_of_k"] == pytest.approx(1.0)
    b = summary["base"]
    # base t1: UNTAGGED1 x2 (0.5 each, right) vs W1 x2 (0.2 each): "2" wins -> right; t2: all W2
    assert b["orm_weighted_maj@k"] == pytest.approx(0.5) and b["orm_best_of_k"] == pytest.approx(0.5)
    rows = pq.read_table(tmp_path / "out" / "eval.parquet").to_pylist()
    assert all(r["orm_score"] == FakeOrm.PROBS.get(r["completion"], 0.5) for r in rows)
    table = {r["checkpoint"]: r for r in pq.read_table(tmp_path / "out" / "summary.parquet").to_pylist()}
    assert table["rl_zero"]["orm_weighted_maj_at_k"] == 1.0 and table["rl_zero"]["orm_best_of_k"] == 1.0
    scaling = pq.read_table(tmp_path / "out" / "scaling.parquet").to_pylist()
    zs = {(r["k"], r["method"]): r["accuracy"] for r in scaling if r["checkpoint"] == "rl_zero"}
    # k = 2, blocks [0, 1] and [2, 3]: t1 [R1, W1] right, [MIX1, W1] ("2" 0.3 vs "3" 0.2) right;
    # t2 [W2, R2] ("5" 0.5 vs "6" 0.45) wrong, [R2_DEC, W2] right -> (1 + 0.5) / 2; best-of alike
    assert zs[(2, "orm_weighted_maj")] == pytest.approx(0.75) and zs[(2, "orm_best_of")] == pytest.approx(0.75)
    assert zs[(4, "orm_weighted_maj")] == 1.0 and zs[(1, "orm_best_of")] == pytest.approx(0.5)
    assert len(scaling) == 6 * 3 * 6  # checkpoints x k in (1, 2, 4) x (4 methods + 2 ORM ones)


def test_checkpoint_selection(run_inputs, tmp_path) -> None:
    tok = load_tokenizer(run_inputs["base"] / "checkpoint")
    cfg = evaluate.Config(k=2, greedy=False, checkpoints=["rl_zero", "student:s1"])
    summary = evaluate.run(cfg, run_inputs, tmp_path, _ctx(), sampler_factory=_scripted_factory(tok))
    assert list(summary) == ["rl_zero", "student:s1", "best_pass@1"]
    assert summary["rl_zero"]["greedy_accuracy"] is None
    with pytest.raises(ValueError, match=r"names \['student:nope'\], not in this run"):
        evaluate.run(evaluate.Config(checkpoints=["student:nope"]), run_inputs, tmp_path / "x", _ctx(),
                     sampler_factory=_scripted_factory(tok))


def test_dpo_checkpoint_is_found_only_when_the_stage_wrote_one(run_inputs, tmp_path) -> None:
    # a disabled dpo stage leaves an artifact without checkpoint/: no `dpo` row; an enabled one is
    # evaluated as `dpo`, after rl_reasoning and before the students
    (tmp_path / "dpo").mkdir()
    names = [r.name for r in evaluate.find_checkpoints({**run_inputs, "dpo": tmp_path / "dpo"})]
    assert "dpo" not in names
    tok = load_tokenizer(run_inputs["base"] / "checkpoint")
    save_tiny_checkpoint(tmp_path / "dpo" / "checkpoint", tok, dim=40)
    names = [r.name for r in evaluate.find_checkpoints({**run_inputs, "dpo": tmp_path / "dpo"})]
    assert names == ["base", "rl_zero", "sft", "rl_reasoning", "dpo", "student:s1", "baseline:s1"]


def test_answer_keys_vote_by_value() -> None:
    assert evaluate.answer_key(trace("x", "1/2")) == evaluate.answer_key(trace("x", "0.5")) == "1/2"
    assert evaluate.answer_key(trace("x", "-3/4")) == "-3/4"
    assert evaluate.answer_key(" <think> cut off") is None
    assert evaluate.evenly_spaced(10, 3) == [0, 4, 9] and evaluate.evenly_spaced(2, 5) == [0, 1]


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared, loaded 2-core machine: a second intra-op thread only adds
    synchronisation (measured ~5 ms per 32-wide linear with 2 threads vs ~2 us with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_real_tiny_model_end_to_end_is_consistent_and_deterministic(tmp_path, one_thread) -> None:
    """The production path: lm checkpoints, TorchSampler, rewards; random weights, so only
    consistency and determinism are checked, not accuracy."""
    tok = tiny_tokenizer()
    root = tmp_path / "run"
    save_tiny_checkpoint(root / "base" / "checkpoint", tok, seed=1)
    save_tiny_checkpoint(root / "distill" / "students" / "small" / "checkpoint", tok, seed=2, dim=16)
    write_problems(root / "problems", [
        {"id": f"t{i}", "prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "split": "test"}
        for i in range(5)])
    inputs = {"problems": root / "problems", "base": root / "base", "distill": root / "distill"}
    cfg = evaluate.Config(max_problems=3, k=2, max_new_tokens=6, batch_size=4)
    s1 = evaluate.run(cfg, inputs, tmp_path / "a", _ctx())
    s2 = evaluate.run(cfg, inputs, tmp_path / "b", _ctx())
    assert s1 == s2
    a, b = pq.read_table(tmp_path / "a" / "eval.parquet"), pq.read_table(tmp_path / "b" / "eval.parquet")
    assert a.equals(b)

    assert list(s1) == ["base", "student:small", "best_pass@1"]
    rows = a.to_pylist()
    assert len(rows) == 2 * 3 * (2 + 1)
    assert {r["problem_id"] for r in rows} == {"t0", "t2", "t4"}  # evenly spaced over the 5
    for name in ("base", "student:small"):
        m = s1[name]
        assert set(m) == CONTRACT_KEYS
        for key in ("pass@1", "maj@k", "pass@k", "format_rate", "language_mix_rate", "greedy_accuracy"):
            assert 0.0 <= m[key] <= 1.0
        sampled = [r for r in rows if r["checkpoint"] == name and not r["greedy"]]
        greedy = [r for r in rows if r["checkpoint"] == name and r["greedy"]]
        assert len(sampled) == 6 and len(greedy) == 3
        assert all(1 <= r["length"] <= 6 for r in sampled + greedy)
        assert m["pass@1"] == pytest.approx(np.mean([r["correct"] for r in sampled]), abs=1e-6)
        assert m["mean_length"] == pytest.approx(np.mean([r["length"] for r in sampled]), abs=1e-6)
        assert m["pass@1"] <= m["pass@k"]
    model, _, _ = load_checkpoint(root / "base" / "checkpoint")
    assert s1["base"]["params"] == sum(p.numel() for p in model.parameters())
    assert s1["student:small"]["params"] < s1["base"]["params"]


def test_problems_file_missing_a_column_is_a_clear_error(run_inputs, tmp_path) -> None:
    import pyarrow as pa

    from artifacts.store import ArtifactError

    bad = tmp_path / "problems"
    bad.mkdir()
    pq.write_table(pa.table({"id": ["t1"], "prompt": [T1], "split": ["test"], "language": ["en"]}),
                   bad / "problems.parquet")
    with pytest.raises(ArtifactError, match="missing column 'answer'"):
        evaluate.run(evaluate.Config(), {**run_inputs, "problems": bad}, tmp_path / "out", _ctx())


def test_language_mix_counts_short_mixed_traces() -> None:
    short_mix = trace("1+1=2: 2. 所以 2.", "2")  # 2 Han words only
    problems = [evaluate.Problem("t1", T1, "2", "en")] * 3
    graded = evaluate.grade([short_mix, R1, " <think> 1+1=2 </think> <answer> 2 </answer>"], problems)
    assert graded["language_mixed"] == [True, False, False]  # pure arithmetic has nothing to judge
    assert evaluate.grade([short_mix], problems[:1], language_min_words=5)["language_mixed"] == [False]


def test_a_prefilled_think_counts_toward_the_format_rate() -> None:
    problems = [evaluate.Problem("t1", T1, "2", "en")]
    inside = " 1+1=2 </think> <answer> 2 </answer>"  # what a model writes after a "chat_think" prompt
    assert evaluate.grade([inside], problems)["format_ok"] == [False]
    graded = evaluate.grade([inside], problems, think_prefilled=True)
    assert graded["format_ok"] == [True] and graded["correct"] == [True]
