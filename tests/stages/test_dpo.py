"""The dpo stage on small data: disabled, no pairs, training raises the margin, resume, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import torch

from artifacts import ArtifactError
from lm.checkpoint import load_checkpoint, read_safetensors, save_checkpoint
from lm.model import ModelConfig, Transformer
from lm.tokenizer import train_bpe
from stages import dpo as stage
from stages.context import StageContext
from stages.rejection_sampling import PREFERENCE_PAIRS_SCHEMA

torch.set_num_threads(1)  # the test machine is shared


def quiet(run_dir: Path | None = None, stop_after: int | None = None) -> StageContext:
    def progress(iterable, desc="", total=None):
        for i, x in enumerate(iterable):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt(f"simulated crash after {stop_after} steps")
            yield x
    return StageContext(seed=0, run_dir=run_dir, log=lambda msg: None, progress=progress)


def pair_rows(n: int) -> list[dict]:
    """Correct (chosen) vs wrong (rejected) answers to small sums."""
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"problem_id": f"p{i}", "prompt": f"What is {a} + {b}?",
                     "chosen": f"<think> {a} plus {b} is {a + b} </think> <answer> {a + b} </answer>",
                     "rejected": f"<think> {a} and {b} </think> <answer> {a + b + 3} </answer>",
                     "answer": str(a + b), "chosen_sample": 0, "rejected_sample": 1})
    return rows


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory) -> Path:
    """A stand-in rl_reasoning artifact: a random small model with a BPE trained on the pairs' text."""
    texts = [f"{r['prompt']} {r['chosen']} {r['rejected']}" for r in pair_rows(40)]
    tok = train_bpe(texts, 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    ffn_dim=64, max_seq_len=128))
    d = tmp_path_factory.mktemp("rl_reasoning")
    save_checkpoint(d / "checkpoint", model, tok, {"stage": "rl_reasoning"})
    return d


def write_pairs(d: Path, rows: list[dict], plain: bool = False) -> Path:
    """rejection_sampling's file (chat messages + `*_text` strings), or a user's plain-string pairs."""
    d.mkdir(parents=True, exist_ok=True)
    if plain:
        table = pa.Table.from_pylist(rows)
    else:
        def turn(role: str, text: str) -> list[dict]:
            return [{"role": role, "content": text}]
        table = pa.Table.from_pylist(
            [r | {"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["chosen"]),
                  "rejected": turn("assistant", r["rejected"]), "prompt_text": r["prompt"],
                  "chosen_text": r["chosen"], "rejected_text": r["rejected"]} for r in rows],
            schema=PREFERENCE_PAIRS_SCHEMA)
    pq.write_table(table, d / "preference_pairs.parquet")
    return d


SMALL = dict(enabled=True, steps=12, batch_size=8, lr=3e-3, warmup_steps=0, autocast=False, log_every=4,
             checkpoint_every=4)


def run(start: Path, pairs: Path, out: Path, ctx: StageContext | None = None, **cfg) -> dict:
    return stage.run(stage.Config(**(SMALL | cfg)), {"rl_reasoning": start, "rejection_sampling": pairs}, out,
                     ctx or quiet())


@pytest.mark.parametrize("loss,plain", [("sigmoid", False), ("ipo", False), ("sigmoid", True)])
def test_dpo_raises_the_chosen_minus_rejected_margin(start_dir, tmp_path, loss, plain) -> None:
    pairs = write_pairs(tmp_path / "rs", pair_rows(24), plain=plain)
    summary = run(start_dir, pairs, tmp_path / "out", loss=loss)
    json.dumps(summary)
    assert summary["pairs"] == 24 and summary["steps"] == 12
    # the policy starts as the reference: margin exactly 0, no pair ahead
    assert summary["initial_margin"] == pytest.approx(0.0, abs=1e-5)
    # observed after 12 steps: margin 11.6 (sigmoid), 4.3 (ipo, whose target is 1/(2β) = 5), accuracy 1.0
    assert summary["final_margin"] > 1.0, summary
    assert summary["final_accuracy"] > 0.8, summary
    rows = pq.read_table(tmp_path / "out" / "metrics.parquet").to_pylist()
    names = {r["name"] for r in rows}
    assert {"loss", "margin", "reward_chosen", "reward_rejected", "accuracy", "lr", "grad_norm",
            "eval/margin", "eval/accuracy"} <= names
    assert all(math.isfinite(r["value"]) for r in rows)
    model, tok, meta = load_checkpoint(tmp_path / "out" / "checkpoint")
    assert meta["stage"] == "dpo" and meta["loss"] == loss and tok is not None


def test_disabled_writes_no_checkpoint(start_dir, tmp_path) -> None:
    pairs = write_pairs(tmp_path / "rs", pair_rows(4))
    summary = run(start_dir, pairs, tmp_path / "out", enabled=False)
    assert summary == {"enabled": False}
    assert not (tmp_path / "out" / "checkpoint").exists()
    assert pq.read_table(tmp_path / "out" / "metrics.parquet").num_rows == 0


def test_no_pairs_keeps_the_start_checkpoint(start_dir, tmp_path) -> None:
    pairs = write_pairs(tmp_path / "rs", [])
    summary = run(start_dir, pairs, tmp_path / "out")
    assert summary["pairs"] == 0 and summary["steps"] == 0
    a = read_safetensors(start_dir / "checkpoint" / "model.safetensors")
    b = read_safetensors(tmp_path / "out" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_crash_equals_an_uninterrupted_run(start_dir, tmp_path) -> None:
    pairs = write_pairs(tmp_path / "rs", pair_rows(16))
    whole = run(start_dir, pairs, tmp_path / "whole", steps=8)
    scratch = tmp_path / "scratch"
    with pytest.raises(KeyboardInterrupt):
        run(start_dir, pairs, tmp_path / "crashed", ctx=quiet(scratch, stop_after=5), steps=8)
    resumed = run(start_dir, pairs, tmp_path / "resumed", ctx=quiet(scratch), steps=8)
    assert resumed["final_margin"] == pytest.approx(whole["final_margin"], abs=1e-6)
    a = read_safetensors(tmp_path / "whole" / "checkpoint" / "model.safetensors")
    b = read_safetensors(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_named(start_dir, tmp_path) -> None:
    d = tmp_path / "rs"
    d.mkdir()
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"]}), d / "preference_pairs.parquet")
    with pytest.raises(ArtifactError, match="rejected"):
        run(start_dir, d, tmp_path / "out")
    with pytest.raises(pydantic.ValidationError, match="sigmoid"):
        stage.Config(loss="hinge")
