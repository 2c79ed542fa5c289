"""Writing r1flow models and tokenizers as Hugging Face model directories (the inverse of `lm.hf`).

Where from: transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` names and config keys, Meta's
`convert_llama_weights_to_hf.py` (`permute`: interleaved rotary rows -> rotate-half rows), and
transformers' `convert_slow_tokenizer.TikTokenConverter` for the tokenizer.

- Weights: r1flow's Meta names become HF names; the q/k rows (and Qwen2's q/k biases) of each head
  are reordered from Meta's interleaved rotary layout to HF's rotate-half layout.
- `config.json`: a `LlamaConfig` (a `Qwen2Config` when the model has q/k/v biases) with rope theta,
  tied embeddings, grouped-query heads, RMSNorm eps and the context length.
- `tokenizer.json`: a `tokenizers` byte-level BPE equivalent to the tiktoken encoding. The vocab is
  spelled in GPT-2's byte-to-unicode alphabet; the merges are derived from the ranks as
  `TikTokenConverter` does (every split of a token into two tokens, ordered by the token's rank),
  with `ignore_merges` (tiktoken returns a whole piece that is a token without merging); the
  pre-tokenizer is the encoding's own split regex, then `ByteLevel(use_regex=False)`; special
  tokens are added tokens. An id map (foreign vocabularies) writes each token under its model id.
  Bytes a foreign vocabulary lacks (r1flow encodes them as its unknown / end-of-text id) are left
  out of the vocab and that id becomes `unk_token`, so HF encodes them to the same id.
- `tokenizer_config.json`: BOS / EOS / PAD, `add_bos_token`, the chat template, and
  `PreTrainedTokenizerFast` as the class, so transformers uses `tokenizer.json` as written.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from lm.bpe_convert import bytes_to_unicode
from lm.model import ModelConfig
from lm.tokenizer import Tokenizer

__all__ = ["permute_rotary", "hf_config", "hf_tensors", "tokenizer_json", "tokenizer_config",
           "generation_config", "hf_files", "hf_split_regex", "is_control_token"]

_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
# r1flow's short linear-layer names -> HF module names (LoRA target_modules).
HF_MODULES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
              "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# --------------------------------------------------------------------------------------------------
# Weights and config


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved rows -> HF rotate-half rows, per head (HF's `permute`; inverse of
    `lm.hf.unpermute_rotary`). w: [n_heads * hd, ...]; Meta row 2j -> HF row j, 2j+1 -> hd/2 + j."""
    rows = w.shape[0]
    hd = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)  # [H hd, ...]


def hf_name(name: str) -> str:
    """The HF parameter name of an r1flow state-dict name."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)  # layers, N, rest
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise KeyError(f"no Hugging Face name for tensor {name!r}")


def hf_tensors(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An r1flow state dict under HF names, q/k rows in HF's rotate-half layout, contiguous on CPU."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if ".attention.wq." in name:
            t = permute_rotary(t, cfg.n_heads)
        elif ".attention.wk." in name:
            t = permute_rotary(t, cfg.n_kv_heads)
        out[hf_name(name)] = t.detach().cpu().contiguous()
    return out


def hf_config(cfg: ModelConfig, tok: Tokenizer | None, dtype: torch.dtype) -> dict[str, Any]:
    """`config.json` of a `LlamaForCausalLM` (`Qwen2ForCausalLM` with q/k/v biases)."""
    qwen2 = cfg.qkv_bias
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if tok is not None:
        out.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return out


def generation_config(tok: Tokenizer | None) -> dict[str, Any]:
    """`generation_config.json`: stop at end-of-text (and the chat turn's end when it has one)."""
    if tok is None:
        return {"_from_model_config": True}
    eos = [tok.eos_id] + [i for s, i in tok.special_tokens.items() if s == "<|im_end|>" and i != tok.eos_id]
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tok.pad_id, "do_sample": False}


# --------------------------------------------------------------------------------------------------
# Tokenizer


def hf_split_regex(pat_str: str) -> str:
    """The tiktoken split regex as `tokenizers` (Oniguruma) reads it the same way.

    The one construct that differs is `$`: end of text for tiktoken's fancy-regex, end of *line*
    for Oniguruma; it becomes `\\z`. Escaped dollars and dollars in character classes stay.
    """
    out, i, in_class = [], 0, False
    while i < len(pat_str):
        c = pat_str[i]
        if c == "\\":
            out.append(pat_str[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append("\\z" if c == "$" and not in_class else c)
        i += 1
    return "".join(out)


def is_control_token(tok: Tokenizer, text: str) -> bool:
    """Whether a special token is a control token (`<|...|>`, BOS/EOS/PAD), which HF marks
    `special` (vLLM and `decode(skip_special_tokens=True)` hide it), rather than a plain added
    token such as `<think>`, whose text stays visible in decoded output."""
    tid = tok.special_tokens[text]
    return (text.startswith("<|") and text.endswith("|>")) or tid in (tok.bos_id, tok.eos_id, tok.pad_id)


def _ordinary_tokens(tok: Tokenizer) -> tuple[dict[bytes, int], dict[bytes, int], int | None]:
    """(bytes -> rank, bytes -> model id, the id that bytes missing from the vocabulary encode to).

    With an id map, a rank whose id is a special token's or already taken is a byte the foreign
    vocabulary lacks (see `lm.bpe_convert.make_tokenizer`): it is left out.
    """
    ranks: dict[bytes, int] = dict(tok.encoding._mergeable_ranks)
    id_map = tok._id_map
    if id_map is None:
        return ranks, dict(ranks), None
    special_ids = set(tok.special_tokens.values())
    ids: dict[bytes, int] = {}
    taken: set[int] = set()
    fallback = None
    for b, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        tid = int(id_map[rank])
        if tid in special_ids or tid in taken:
            fallback = tid
            continue
        ids[b] = tid
        taken.add(tid)
    return {b: r for b, r in ranks.items() if b in ids}, ids, fallback


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, by the token's rank, then the pieces' ranks
    (`TikTokenConverter.extract_vocab_merges_from_model`)."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def tokenizer_json(tok: Tokenizer) -> dict[str, Any]:
    """`tokenizer.json` (HF `tokenizers`) encoding text to the same ids as `tok`."""
    spell = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    ranks, ids, fallback = _ordinary_tokens(tok)
    # Special tokens sit in the vocab too (as in SmolLM2's own file): an `unk_token` must be there.
    vocab = {text(b): i for b, i in ids.items()} | tok.special_tokens
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    merges = [[text(a), text(b)] for a, b in _merges(ranks)]
    by_id = {i: s for s, i in tok.special_tokens.items()}
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": is_control_token(tok, s)} for i, s in sorted(by_id.items())]
    unk = by_id.get(fallback) if fallback is not None else None
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.decode([tok.bos_id])
        post: dict[str, Any] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    else:
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": hf_split_regex(tok.encoding._pat_str)},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": vocab, "merges": merges},
    }


def tokenizer_config(tok: Tokenizer, max_len: int) -> dict[str, Any]:
    """`tokenizer_config.json`: the special tokens by role, BOS setting and chat template."""
    def name(tid: int | None) -> str | None:
        return None if tid is None else tok.decode([tid])

    by_id = {i: s for s, i in tok.special_tokens.items()}
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id),
        "add_bos_token": bool(tok.add_bos), "add_eos_token": False,
        "model_max_length": max_len, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": is_control_token(tok, s)}
                                 for i, s in sorted(by_id.items())},
    }
    if tok.chat_template:
        out["chat_template"] = tok.chat_template
    return out


def hf_files(cfg: ModelConfig, tok: Tokenizer | None, dtype: torch.dtype) -> dict[str, str]:
    """The JSON files of an HF model directory (everything but the weights), name -> text."""
    files = {"config.json": hf_config(cfg, tok, dtype), "generation_config.json": generation_config(tok)}
    if tok is not None:
        files["tokenizer.json"] = tokenizer_json(tok)
        files["tokenizer_config.json"] = tokenizer_config(tok, cfg.max_seq_len)
    return {k: json.dumps(v, indent=1, ensure_ascii=False) for k, v in files.items()}
