"""The outcome reward model: its loss and AUC by hand, and training that separates labels on a toy."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lm.checkpoint import save_checkpoint
from lm.model import ModelConfig, Transformer
from lm.tokenizer import train_bpe
from lm.value import load_value_model
from stages import orm
from stages.context import StageContext

torch.set_num_threads(1)  # the test machine is shared


def quiet() -> StageContext:
    return StageContext(seed=0, log=lambda msg: None, progress=lambda it, **_: it)


def test_orm_loss_hand_worked() -> None:
    # logits [0, ln 3], labels [1, 0]: BCE = (-ln σ(0) - ln(1 - σ(ln 3))) / 2 = (ln 2 + ln 4) / 2
    # = 1.5 ln 2 = 1.03972; p = [0.5, 0.75]: accuracy (p > 0.5 == label) = [0, 0] -> 0; mean p 0.625
    loss, m = orm.orm_loss(torch.tensor([0.0, math.log(3)]), torch.tensor([1.0, 0.0]))
    assert float(loss) == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert float(m["accuracy"]) == 0.0 and float(m["prob"]) == pytest.approx(0.625)
    # the gradient of the mean BCE is (σ(z) - y) / B: [(0.5 - 1) / 2, (0.75 - 0) / 2]
    z = torch.tensor([0.0, math.log(3)], requires_grad=True)
    orm.orm_loss(z, torch.tensor([1.0, 0.0]))[0].backward()
    assert z.grad.tolist() == pytest.approx([-0.25, 0.375])


def test_roc_auc_hand_worked() -> None:
    # correct scores [0.9, 0.4], incorrect [0.5, 0.4]: pairs (0.9>0.5) 1, (0.9>0.4) 1, (0.4<0.5) 0,
    # (0.4=0.4) 0.5 -> 2.5 / 4
    assert orm.roc_auc([0.9, 0.5, 0.4, 0.4], [True, False, True, False]) == pytest.approx(0.625)
    assert orm.roc_auc([0.1, 0.2], [True, True]) is None
    m = orm.measure([0.0, math.log(3)], [True, False])
    assert m["loss"] == pytest.approx(1.5 * math.log(2)) and m["accuracy"] == 0.0 and m["auc"] == 0.0


def toy_rows(n: int) -> tuple[list[str], list[str], list[bool], list[str]]:
    """Questions with a right (ends 'ok') or wrong (ends 'no') completion, both for each question:
    the label is readable from the completion's last tokens."""
    prompts, completions, labels, groups = [], [], [], []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        for ok in (True, False):
            prompts.append(f"What is {a} + {b}?")
            completions.append(f"<think> {a} plus {b} </think> <answer> {a + b if ok else a + b + 2} </answer> "
                               + ("ok ok" if ok else "no no"))
            labels.append(ok)
            groups.append(f"p{i}")
    return prompts, completions, labels, groups


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory) -> Path:
    prompts, completions, _, _ = toy_rows(20)
    tok = train_bpe([f"{p} {c}" for p, c in zip(prompts, completions)], 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    ffn_dim=64, max_seq_len=128))
    return save_checkpoint(tmp_path_factory.mktemp("rl_reasoning") / "checkpoint", model, tok, {"stage": "test"})


def test_training_separates_correct_from_incorrect(start_dir, tmp_path) -> None:
    prompts, completions, labels, groups = toy_rows(20)
    cfg = orm.OrmConfig(enabled=True, steps=30, batch_size=8, lr=3e-3, warmup_steps=2, holdout=0.25, autocast=False)
    metrics, summary = orm.fit(cfg, start_dir, prompts, completions, labels, groups, "r1_zero_short",
                               tmp_path / "orm", quiet())
    evals = {(r["step"], r["name"]): r["value"] for r in metrics.rows if r["name"].startswith("eval/")}
    assert evals[(0, "eval/loss")] == pytest.approx(math.log(2), abs=1e-6)  # zero head: p = 0.5 everywhere
    assert evals[(30, "eval/loss")] < 0.3
    assert summary["orm_heldout_auc"] == 1.0 and summary["orm_heldout_accuracy"] == 1.0
    assert summary["orm_candidates"] == 40 and summary["orm_positive_rate"] == 0.5
    # the saved ORM scores held-out-style text as the trained one did
    scorer = orm.find(tmp_path, "cpu")
    probs = scorer.probabilities(["What is 3 + 4?", "What is 3 + 4?"],
                                 ["<think> 3 plus 4 </think> <answer> 7 </answer> ok ok",
                                  "<think> 3 plus 4 </think> <answer> 9 </answer> no no"])
    assert probs[0] > 0.8 and probs[1] < 0.2
    _, _, meta = load_value_model(tmp_path / "orm")
    assert meta["kind"] == "orm" and meta["template"] == "r1_zero_short"


def test_find_is_none_without_an_orm(tmp_path) -> None:
    assert orm.find(tmp_path, "cpu") is None and orm.find(None, "cpu") is None
