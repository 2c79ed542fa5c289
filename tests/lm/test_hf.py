"""Hugging Face layout checkpoints (lm/hf.py, lm/loading.py).

The rotary q/k permutation is checked twice: without transformers, by writing r1flow weights in
HF layout with the permutation of HF's own conversion script (copied here) and loading them back;
and against transformers, with tiny random Llama and Qwen2 models it saves itself, next to a
handwritten byte-level `tokenizer.json` that HF `tokenizers` reads as the reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lm.bpe_convert import QWEN2_SPLIT, bytes_to_unicode
from lm.hf import (HFCheckpointError, hf_model_config, hf_split_pattern, load_hf, load_hf_model,
                   load_hf_tokenizer)
from lm.gguf import LoadError
from lm.loading import load_model
from lm.model import ModelConfig, Transformer
from tests.lm.varied_texts import varied_texts

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "Ġ Ġ", "o n", "Ġ o", "a n", "r e", "Ġ s", "ĠĠ ĠĠ"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# --------------------------------------------------------------------------------------------------
# A handwritten tokenizer.json


def write_tokenizer(d: Path, *, kind: str) -> dict[str, int]:
    """A byte-level BPE tokenizer.json + tokenizer_config.json; returns the special token ids.

    kind "llama": SmolLM-style Digits + ByteLevel pre-tokenizer, specials first (ids 0..2), BOS
    added by a TemplateProcessing post-processor, merges as "a b" strings.
    kind "qwen2": Qwen2's Split regex + ByteLevel(use_regex=False), NFC normalizer, specials after
    the vocabulary, merges as [a, b] pairs, and token ids that do not follow merge order (the
    merged tokens are numbered in reverse), so the converter needs an id map.
    """
    table = bytes_to_unicode()
    merged = [m.replace(" ", "") for m in MERGES]
    if kind == "llama":
        specials = {s: i for i, s in enumerate(SPECIALS)}
        vocab = {**specials, **{table[b]: 3 + b for b in range(256)}}  # as SmolLM's: specials in vocab too
        vocab.update({t: 259 + i for i, t in enumerate(merged)})
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        merges: list = MERGES
        normalizer = None
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
        config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    else:
        vocab = {table[b]: b for b in range(256)}
        vocab.update({t: 256 + len(merged) - 1 - i for i, t in enumerate(merged)})
        specials = {s: 256 + len(merged) + i for i, s in enumerate(SPECIALS)}
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
        merges = [m.split(" ") for m in MERGES]
        normalizer = {"type": "NFC"}
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in specials.items()]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    (d / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return specials


VOCAB = 256 + len(MERGES) + len(SPECIALS)


# --------------------------------------------------------------------------------------------------
# Without transformers: HF's permutation, inverted


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF rows, as in transformers' `convert_llama_weights_to_hf.py` `permute`."""
    dim1 = w.shape[0]
    rest = w.shape[1:]
    return w.view(n_heads, dim1 // n_heads // 2, 2, *rest).transpose(1, 2).reshape(dim1, *rest)


_TO_HF = {
    "attention_norm.weight": "input_layernorm.weight", "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wk.bias": "self_attn.k_proj.bias", "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias", "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight", "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
}


def write_meta_model_as_hf(d: Path, cfg: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)  # nonzero biases, so a wrong bias permutation shows
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest.startswith("attention.wq"):
                t = hf_permute(t, cfg.n_heads)
            elif rest.startswith("attention.wk"):
                t = hf_permute(t, cfg.n_kv_heads)
            hf[f"model.layers.{i}.{_TO_HF[rest]}"] = t.contiguous()
        else:
            hf[{"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}[name]] = t
    save_file(hf, str(d / "model.safetensors"))
    config = {"model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.ffn_dim,
              "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
              "hidden_act": "silu"}
    (d / "config.json").write_text(json.dumps(config))
    return sd


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hf_layout_loads_back_to_the_meta_weights(tmp_path: Path, model_type: str) -> None:
    cfg = ModelConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=96,
                      max_seq_len=64, tie_embeddings=model_type == "qwen2", qkv_bias=model_type == "qwen2")
    sd = write_meta_model_as_hf(tmp_path, cfg, model_type)
    model = load_hf_model(tmp_path)
    assert model.config == cfg
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(sd)
    for name, t in sd.items():
        assert torch.equal(loaded[name], t), name


# --------------------------------------------------------------------------------------------------
# Tokenizer against HF `tokenizers`


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tokenizer_json_matches_hf_tokenizers(tmp_path: Path, kind: str) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    specials = write_tokenizer(tmp_path, kind=kind)
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok = load_hf_tokenizer(tmp_path)
    texts = varied_texts(SPECIALS)
    differ = [s for s in texts if tok.encode(s) != reference.encode(s, add_special_tokens=False).ids]
    assert not differ, f"{len(differ)}/{len(texts)} differ, e.g. {differ[:3]!r}"
    assert all(tok.decode(tok.encode(s)) == s for s in texts)
    assert tok.eos_id == specials["<|im_end|>"] and tok.pad_id == specials["<|endoftext|>"]
    assert tok.chat_template == CHAT_TEMPLATE
    if kind == "llama":
        assert tok.bos_id == 1 and tok.add_bos
        assert reference.encode("hi").ids[0] == 1  # the post-processor really adds it
    else:
        assert tok.bos_id is None and not tok.add_bos


@pytest.mark.parametrize("pre,message", [
    ({"type": "Metaspace"}, "does not end in ByteLevel"),
    ({"type": "ByteLevel", "add_prefix_space": True}, "add_prefix_space"),
    (None, "no pre_tokenizer"),
])
def test_unsupported_pre_tokenizers_are_named(pre, message: str) -> None:
    with pytest.raises(HFCheckpointError, match=message):
        hf_split_pattern(pre)


# --------------------------------------------------------------------------------------------------
# Against transformers


def _save_tiny_hf(d: Path, model_type: str, tie: bool) -> "torch.nn.Module":
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                  rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(0)
    if model_type == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=10000.0, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1000000.0, **common))
        with torch.no_grad():  # Qwen2 initialises biases to zero; random ones test their permutation
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(std=0.5)
    model.save_pretrained(d)
    return model.eval()


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("qwen2", True)])
def test_tiny_models_match_transformers(tmp_path: Path, model_type: str, tie: bool) -> None:
    reference = _save_tiny_hf(tmp_path, model_type, tie)
    write_tokenizer(tmp_path, kind=model_type)
    model, tok = load_model(str(tmp_path))
    assert model.config.qkv_bias == (model_type == "qwen2") and model.config.tie_embeddings == tie
    ids = torch.tensor([tok.encode("<|im_start|>user\nthe answer is 42<|im_end|>")])  # [1, T]
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff < 1e-4


# --------------------------------------------------------------------------------------------------
# Errors


def _small_config(**overrides) -> dict:
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, **overrides}


@pytest.mark.parametrize("overrides,message", [
    ({"model_type": "gemma"}, "unsupported model_type 'gemma'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 16}, "head_dim"),
    ({"hidden_act": "gelu"}, "activation"),
])
def test_unsupported_configs_are_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(_small_config(**overrides)))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFCheckpointError, match=message):
        load_hf_model(tmp_path)


def test_a_truncated_safetensors_file_is_refused(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    write_meta_model_as_hf(tmp_path, cfg, "llama")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(HFCheckpointError, match="cannot read safetensors"):
        load_hf_model(tmp_path)


def test_a_tokenizer_without_eos_is_refused(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, kind="llama")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    with pytest.raises(HFCheckpointError, match="no eos_token"):
        load_hf_tokenizer(tmp_path)


def test_load_hf_refuses_a_tokenizer_larger_than_the_model(tmp_path: Path) -> None:
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    write_meta_model_as_hf(tmp_path, cfg, "llama")
    write_tokenizer(tmp_path, kind="llama")
    with pytest.raises(HFCheckpointError, match="embedding rows"):
        load_hf(tmp_path)


@pytest.mark.parametrize("overrides,message", [
    ({"num_hidden_layers": 10**6}, r"config.json num_hidden_layers: 1000000 is out of range"),
    ({"num_attention_heads": 0}, r"config.json num_attention_heads: 0 is out of range"),
    ({"max_position_embeddings": 10**9}, r"config.json max_position_embeddings: 1000000000 is out of range"),
    ({"hidden_size": "wide"}, r"config.json hidden_size: must be an integer"),
    ({"num_hidden_layers": 2}, r"n_layers: config says 2, the file holds 1 layers"),  # in bounds, a lie
])
def test_hostile_size_fields_fail_fast_naming_the_field(tmp_path: Path, overrides: dict, message: str) -> None:
    import time

    cfg = hf_model_config(_small_config())
    write_meta_model_as_hf(tmp_path, cfg, "llama")
    (tmp_path / "config.json").write_text(json.dumps(_small_config(**overrides)))
    start = time.perf_counter()
    with pytest.raises(LoadError, match=message):  # HFCheckpointError for the config, LoadError for tensors
        load_hf_model(tmp_path)
    assert time.perf_counter() - start < 5.0
