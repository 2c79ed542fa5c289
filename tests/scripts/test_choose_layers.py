"""scripts/choose_layers.py: greedy block removal for depth-pruned students."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm.model import ModelConfig, Transformer
from stages.distill import prune_layers
from stages.lm_training import Example, collate

_spec = importlib.util.spec_from_file_location(
    "choose_layers", Path(__file__).resolve().parents[2] / "scripts" / "choose_layers.py")
choose_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(choose_layers)


def _model(n_layers: int = 4) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                                   ffn_dim=64, max_seq_len=32)).eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 40, (n,), generator=g).tolist() for n in (12, 9, 7)]
    batch = collate([Example(np.array(r), np.arange(len(r)) >= 3) for r in rows], pad_id=0)
    return batch.ids, batch.loss_mask


def _pruned_loss(model: Transformer, keep: list[int], ids: torch.Tensor, mask: torch.Tensor) -> float:
    with torch.no_grad():
        logits = prune_layers(model, keep)(ids)[:, :-1]
    return F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]]).item()


def _own_text(model: Transformer) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's greedy continuations of a few first tokens: the full model's loss on them is
    low, so removing any block that does something raises it."""
    ids = torch.arange(3).view(3, 1)
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids, torch.arange(ids.shape[1]).expand_as(ids) >= 1


def test_a_block_that_does_nothing_goes_first():
    model = _model()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3)  # sharper next-token distributions (tied output)
        for block in model.layers:  # blocks that change the predictions (at init they barely do)
            block.attention.wo.weight.mul_(50)
            block.feed_forward.w2.weight.mul_(50)
        # block 2 adds nothing to the residual stream: removing it is free, removing any other is not
        model.layers[2].attention.wo.weight.zero_()
        model.layers[2].feed_forward.w2.weight.zero_()
    ids, mask = _own_text(model)
    assert choose_layers.greedy_keep(model, ids, mask, 3) == [0, 1, 3]


def test_each_round_scores_the_pruned_model_it_names():
    model = _model()
    ids, mask = _data()
    records = []
    keep = choose_layers.greedy_keep(model, ids, mask, 2, records.append)
    assert len(keep) == 2 and keep == sorted(keep)
    assert records[0]["keep"] == [0, 1, 2, 3]
    assert records[0]["loss"] == pytest.approx(_pruned_loss(model, [0, 1, 2, 3], ids, mask), abs=1e-5)
    for r in records[1:]:  # the cached hidden states give the pruned model's own loss
        assert r["loss"] == pytest.approx(_pruned_loss(model, r["keep"], ids, mask), abs=1e-5)
        assert r["loss"] == pytest.approx(min(r["candidates"].values()), abs=1e-4)
        assert r["removed"] not in r["keep"]
    assert records[-1]["keep"] == keep


def test_keeping_more_blocks_than_the_model_has_is_an_error():
    ids, mask = _data()
    with pytest.raises(ValueError, match="has 4 blocks"):
        choose_layers.greedy_keep(_model(), ids, mask, 5)


def test_a_missing_checkpoint_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-checkpoint"
    assert choose_layers.main([str(missing), str(tmp_path / "traces.parquet"), "--keep", "3"]) == 2
    assert str(missing) in capsys.readouterr().err
