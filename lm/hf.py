"""Checkpoints in Hugging Face layout (`config.json` + `*.safetensors` + `tokenizer.json`) for the
Llama and Qwen2 architectures, as r1flow models and tokenizers.

Where from: transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` parameter names and config keys,
and Meta's `convert_llama_weights_to_hf.py`, whose `permute` this file inverts.

- HF applies rotary embeddings in the "rotate half" layout (dimension i pairs with i + hd/2);
  Meta and `lm.model` rotate interleaved pairs (2i, 2i+1). HF's conversion script reorders the
  rows of each q/k head from interleaved to halves; `unpermute_rotary` reorders them back, and
  does the same to Qwen2's q/k biases, which live in the same output space.
- Weights are read with safetensors only (never pickle); sharded checkpoints are read through
  `model.safetensors.index.json` or, without one, every `*.safetensors` file in the directory.
- `tokenizer.json` (HF `tokenizers`, byte-level BPE) is converted by `lm.bpe_convert`; special
  ids, `add_bos_token` and the chat template come from `tokenizer_config.json` (or a
  `chat_template.jinja` file, as transformers 5 saves it).
- Unsupported, with a clear error: other architectures, RoPE scaling, partial rotary, a head_dim
  other than hidden_size / heads, biases other than Qwen2's q/k/v, activations other than SiLU,
  sliding-window attention, non-byte-level or byte-fallback tokenizers. A tokenizer `NFC`
  normalizer (Qwen2) is accepted but not applied: text that is not already NFC-normalised may
  tokenize differently from HF.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lm.bpe_convert import (DIGITS_THEN_GPT2_SPLIT, GPT2_SPLIT, BPEConversionError,
                            convert_byte_level_bpe, make_tokenizer)
from lm.gguf import LoadError, build_model, target_dtype
from lm.model import ModelConfig, ModelConfigError, Transformer
from lm.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


class HFCheckpointError(LoadError):
    """A Hugging Face checkpoint r1flow cannot load, with the reason."""


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A directory with an HF `config.json` (it has `model_type`) and safetensors weights."""
    d = Path(path)
    cfg = d / "config.json"
    if not (d.is_dir() and cfg.is_file() and any(d.glob("*.safetensors"))):
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------------------------------
# Config and weights


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFCheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise HFCheckpointError(f"{path} must hold a JSON object")
    return data


def hf_model_config(hf: dict[str, Any], max_seq_len: int | None = None) -> ModelConfig:
    """`ModelConfig` from an HF `config.json` dict (Llama or Qwen2), refusing what `lm.model`
    cannot compute."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(f"unsupported model_type {model_type!r}: r1flow loads {list(SUPPORTED_MODEL_TYPES)}")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
    rope_type = rope.get("rope_type", "default")
    scaling = hf.get("rope_scaling")
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise HFCheckpointError(f"RoPE scaling ({scaling or rope}) is not supported")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFCheckpointError("partial rotary embeddings are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"activation {hf['hidden_act']!r} is not supported (SwiGLU with SiLU only)")
    if hf.get("mlp_bias"):
        raise HFCheckpointError("mlp_bias is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise HFCheckpointError("attention_bias (biases on q/k/v/o) is not supported for llama")
    if hf.get("use_sliding_window"):
        raise HFCheckpointError("sliding-window attention is not supported")
    n_heads = _int_field(hf, "num_attention_heads")
    context = _int_field(hf, "max_position_embeddings", 2048)
    try:  # every size is checked against sane bounds here, before anything is allocated
        cfg = ModelConfig(
            vocab_size=_int_field(hf, "vocab_size"), dim=_int_field(hf, "hidden_size"),
            n_layers=_int_field(hf, "num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=_int_field(hf, "num_key_value_heads", n_heads),
            ffn_dim=_int_field(hf, "intermediate_size"),
            norm_eps=_float_field(hf, "rms_norm_eps", 1e-6),
            rope_theta=_float_field(rope, "rope_theta", _float_field(hf, "rope_theta", 10000.0)),
            max_seq_len=min(context, max_seq_len) if max_seq_len else context,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
        )
    except ModelConfigError as e:
        raise HFCheckpointError(f"config.json {_HF_FIELDS.get(e.field, e.field)}: {e.reason}") from None
    except ValueError as e:  # hidden_size not divisible by num_attention_heads, ...
        raise HFCheckpointError(f"config.json: {e}") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise HFCheckpointError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads: not supported")
    return cfg


# ModelConfig field -> the Hugging Face config.json key it comes from (to name it in errors)
_HF_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
              "ffn_dim": "intermediate_size", "max_seq_len": "max_position_embeddings",
              "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta"}


def _int_field(hf: dict[str, Any], key: str, default: Any = ...) -> int:
    value = hf.get(key)
    if value is None:
        if default is ...:
            raise HFCheckpointError(f"config.json has no {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise HFCheckpointError(f"config.json {key}: must be an integer, got {value!r}")
    return int(value)


def _float_field(hf: dict[str, Any], key: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HFCheckpointError(f"config.json {key}: must be a number, got {value!r}")
    return float(value)


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta interleaved rows, per head (inverse of HF's `permute`).

    w: [n_heads * hd, dim] weight or [n_heads * hd] bias. Within a head, HF row j < hd/2 holds
    Meta row 2j and row hd/2 + j holds Meta row 2j + 1.
    """
    rows = w.shape[0]
    hd = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hd // 2, *rest).transpose(1, 2).reshape(rows, *rest)  # [H hd, ...]


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (sharded or not), read without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFCheckpointError(f"{index} has no 'weight_map'")
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise HFCheckpointError(f"{directory}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise HFCheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return tensors


def hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                  dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """HF tensors under r1flow's names, q/k rows (and biases) unpermuted to Meta's rotary layout,
    cast to `dtype` (None keeps the stored dtypes)."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved; recomputed
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        ours = _r1flow_name(name)
        if ".attention.wq." in ours:
            t = unpermute_rotary(t, cfg.n_heads)
        elif ".attention.wk." in ours:
            t = unpermute_rotary(t, cfg.n_kv_heads)
        sd[ours] = t if dtype is None else t.to(dtype)
    return sd


def _r1flow_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise HFCheckpointError(f"unexpected tensor {name!r} for a Llama/Qwen2 checkpoint")


def load_hf_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = "fp32", max_seq_len: int | None = None) -> Transformer:
    """A `Transformer` holding an HF-layout checkpoint's weights, in eval mode.

    `dtype`: "fp32", "bf16", "fp16" or a torch dtype; "auto" keeps the stored dtype.
    """
    d = Path(path)
    cfg = hf_model_config(_read_json(d / "config.json"), max_seq_len)
    tensors = read_safetensors(d)
    stored = next(iter(tensors.values())).dtype if tensors else torch.float32
    cast = target_dtype(dtype, stored)
    return build_model(cfg, hf_state_dict(tensors, cfg, cast), device, cast, str(d))


# --------------------------------------------------------------------------------------------------
# Tokenizer


def hf_split_pattern(pre: dict[str, Any] | None) -> str:
    """The one tiktoken regex equivalent to a `tokenizer.json` byte-level `pre_tokenizer`.

    Supported: `ByteLevel(use_regex=True)` (GPT-2), `Sequence[Digits(individual), ByteLevel]`
    (SmolLM, StarCoder) and `Sequence[Split(Regex, Isolated), ByteLevel(use_regex=False)]`
    (Llama 3, Qwen2).
    """
    if not pre:
        raise HFCheckpointError("tokenizer.json has no pre_tokenizer: not a byte-level BPE tokenizer")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None:
        raise HFCheckpointError(f"pre_tokenizer {kinds} does not end in ByteLevel: not supported")
    if byte_level.get("add_prefix_space"):
        raise HFCheckpointError("ByteLevel(add_prefix_space=True) is not supported")
    uses_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and uses_regex:
        return GPT2_SPLIT
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and uses_regex:
        return DIGITS_THEN_GPT2_SPLIT
    if kinds == ["Split", "ByteLevel"] and not uses_regex:
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
            return pattern
    raise HFCheckpointError(f"unsupported pre_tokenizer sequence {kinds}: {json.dumps(pre)[:300]}")


def _token_text(value: Any) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_hf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of an HF checkpoint directory (`tokenizer.json` + `tokenizer_config.json`)."""
    d = Path(path)
    tj = _read_json(d / "tokenizer.json")
    tc = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    hf_cfg = _read_json(d / "config.json") if (d / "config.json").is_file() else {}
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise HFCheckpointError(f"tokenizer model {model.get('type')!r}: only byte-level BPE is supported")
    if model.get("byte_fallback"):
        raise HFCheckpointError("byte_fallback BPE (sentencepiece-style) is not supported")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise HFCheckpointError("BPE with subword prefixes/suffixes is not supported")
    normalizer = tj.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise HFCheckpointError(f"tokenizer normalizer {normalizer.get('type')!r} is not supported")
    added = {t["content"]: int(t["id"]) for t in tj.get("added_tokens") or []}
    vocab = {tok: int(i) for tok, i in model.get("vocab", {}).items() if tok not in added}
    try:
        bpe = convert_byte_level_bpe(d.name or "hf", vocab, model.get("merges", []), added,
                                     hf_split_pattern(tj.get("pre_tokenizer")))
    except BPEConversionError as e:
        raise HFCheckpointError(f"cannot convert {d / 'tokenizer.json'}: {e}") from e

    def special_id(key: str, required: bool) -> int | None:
        text = _token_text(tc.get(key))
        if text is not None:
            if text not in added and text not in vocab:
                raise HFCheckpointError(f"tokenizer_config.json {key} {text!r} is not in the vocabulary")
            return added.get(text, vocab.get(text))
        value = hf_cfg.get(f"{key}_id")
        value = value[0] if isinstance(value, list) and value else value
        if value is None and required:
            raise HFCheckpointError(f"no {key}: set it in tokenizer_config.json or {key}_id in config.json")
        return value

    bos_id = special_id("bos_token", required=False)
    add_bos = bool(tc.get("add_bos_token", _post_processor_adds_bos(tj, bos_id)))
    unk = model.get("unk_token")
    return make_tokenizer(bpe, bos_id=bos_id, eos_id=special_id("eos_token", required=True),
                          pad_id=special_id("pad_token", required=False),
                          unknown_id=added.get(unk, vocab.get(unk)) if unk else None, add_bos=add_bos,
                          chat_template=_chat_template(d, tc))


def _post_processor_adds_bos(tj: dict[str, Any], bos_id: int | None) -> bool:
    """Whether `tokenizer.json`'s TemplateProcessing starts a single sequence with the BOS token."""
    post = tj.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0]
            if "SpecialToken" in first:
                ids = (step.get("special_tokens", {}).get(first["SpecialToken"]["id"]) or {}).get("ids", [])
                return bos_id is not None and ids == [bos_id]
    return False


def _chat_template(d: Path, tc: dict[str, Any]) -> str | None:
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_hf(path: str | os.PathLike[str], device: str | torch.device = "cpu",
            dtype: str | torch.dtype = "fp32") -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of an HF checkpoint directory."""
    tok = load_hf_tokenizer(path)
    model = load_hf_model(path, device, dtype)
    if tok.vocab_size > model.config.vocab_size:
        raise HFCheckpointError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model only "
                                f"{model.config.vocab_size} embedding rows")
    return model, tok
