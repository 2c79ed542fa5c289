"""lm.value: a ValueModel saved and loaded gives the same values; a malformed head is named."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save as st_save

from lm.checkpoint import CheckpointError
from lm.model import ModelConfig, Transformer
from lm.value import HEAD, ValueModel, load_value_model, save_value_model


def _model() -> ValueModel:
    torch.manual_seed(0)
    model = ValueModel(Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                               ffn_dim=32, max_seq_len=32)))
    torch.nn.init.normal_(model.head.weight)  # a non-zero head, as after training
    return model.eval()


def test_save_load_round_trip(tmp_path) -> None:
    model = _model()
    save_value_model(tmp_path / "v", model, None, {"kind": "orm"})
    loaded, tok, meta = load_value_model(tmp_path / "v")
    tokens = torch.randint(0, 64, (2, 7))
    assert tok is None and meta == {"kind": "orm"}
    assert torch.equal(loaded(tokens), model(tokens))


def test_a_malformed_head_is_named(tmp_path) -> None:
    save_value_model(tmp_path / "v", _model(), None)
    (tmp_path / "v" / HEAD).write_bytes(st_save({"weight": torch.zeros(1, 8), "bias": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="value_head.safetensors"):
        load_value_model(tmp_path / "v")
    (tmp_path / "v" / HEAD).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_value_model(tmp_path / "v")
