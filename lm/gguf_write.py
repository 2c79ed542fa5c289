"""Writing an r1flow model and tokenizer as one GGUF file (llama.cpp's format), the inverse of
`lm.gguf`.

Where from: the GGUF spec (ggml `docs/gguf.md`), llama.cpp's `convert_hf_to_gguf.py` (metadata
keys, token types, merges as "a b" strings) and the `gguf` package's `GGUFWriter`.

- Architecture `llama`; r1flow's Meta-layout weights are what llama.cpp's "norm" rope expects, so
  no q/k permutation (the HF exporter permutes, this one does not). No `output.weight` = tied.
- Tokenizer `gpt2` (byte-level BPE): tokens in model-id order spelled in GPT-2's byte alphabet,
  special tokens as control (`<|...|>`, BOS/EOS/PAD) or user-defined tokens (`<think>`), ids the
  vocabulary leaves empty as unused placeholders; merges derived from the ranks as for
  `tokenizer.json`; `tokenizer.ggml.pre` names the llama.cpp pre-tokenizer whose regex is the
  encoding's split pattern (the project's own BPE: "qwen2"); BOS/EOS/PAD, `add_bos_token` and the
  chat template.
- `dtype`: fp32, f16, bf16 or q8_0 for the matrices; norms (1-D) stay fp32 as llama.cpp needs.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lm.bpe_convert import GGUF_PRE_SPLITS, bytes_to_unicode
from lm.hf_write import _merges, _ordinary_tokens, is_control_token
from lm.model import Transformer
from lm.tokenizer import Tokenizer

__all__ = ["GGUF_DTYPES", "gguf_tensor_name", "pre_tokenizer_name", "write_gguf"]

GGUF_DTYPES = ("fp32", "f16", "bf16", "q8_0")

_BLOCK = {"attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
          "attention.wq.bias": "attn_q.bias", "attention.wk.weight": "attn_k.weight",
          "attention.wk.bias": "attn_k.bias", "attention.wv.weight": "attn_v.weight",
          "attention.wv.bias": "attn_v.bias", "attention.wo.weight": "attn_output.weight",
          "ffn_norm.weight": "ffn_norm.weight", "feed_forward.w1.weight": "ffn_gate.weight",
          "feed_forward.w2.weight": "ffn_down.weight", "feed_forward.w3.weight": "ffn_up.weight"}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's tensor name for an r1flow state-dict name (inverse of `lm.gguf.r1flow_name`)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _BLOCK:
        return f"blk.{parts[1]}.{_BLOCK[parts[2]]}"
    raise KeyError(f"no GGUF name for tensor {name!r}")


def pre_tokenizer_name(tok: Tokenizer) -> str:
    """The `tokenizer.ggml.pre` whose split regex is exactly the encoding's."""
    for name, pattern in GGUF_PRE_SPLITS.items():
        if pattern == tok.encoding._pat_str:
            return name
    raise ValueError("llama.cpp has no pre-tokenizer equivalent to this tokenizer's split regex "
                     f"{tok.encoding._pat_str[:80]!r}...: it cannot be written as GGUF")


def _tokens(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str], int | None]:
    """(tokens by id, their llama.cpp types, merges, the unknown id) for `n_vocab` embedding rows."""
    import gguf

    spell = bytes_to_unicode()
    ranks, ids, fallback = _ordinary_tokens(tok)
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for b, i in ids.items():
        tokens[i] = "".join(spell[x] for x in b)
        types[i] = int(gguf.TokenType.NORMAL)
    for s, i in tok.special_tokens.items():
        tokens[i] = s
        types[i] = int(gguf.TokenType.CONTROL if is_control_token(tok, s) else gguf.TokenType.USER_DEFINED)
    names = [t if t is not None else f"<|r1flow_unused_{i}|>" for i, t in enumerate(tokens)]
    merges = [" ".join("".join(spell[x] for x in part) for part in pair) for pair in _merges(ranks)]
    return names, types, merges, fallback


def _tensor(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, object | None]:
    """The array to store and its raw GGML type (None: let the writer infer F32/F16)."""
    import gguf

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or dtype == "fp32":
        return a, None
    if dtype == "f16":
        return a.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return a.astype(np.float16), None  # a row length Q8_0's 32-blocks do not divide: f16
    return gguf.quants.quantize(a, qtype), qtype


_FILE_TYPES = {"fp32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType


def write_gguf(path: str | os.PathLike[str], model: Transformer, tok: Tokenizer, *, dtype: str = "fp32",
               name: str = "r1flow") -> Path:
    """Write `model` and `tok` as a llama-architecture GGUF file at `path` (not atomically: the
    caller writes to a temporary path and renames)."""
    import gguf

    from lm.checkpoint import export_state_dict

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; use one of {list(GGUF_DTYPES)}")
    cfg = model.config
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {cfg.vocab_size} rows")
    pre = pre_tokenizer_name(tok)
    tokens, types, merges, unknown = _tokens(tok, cfg.vocab_size)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_FILE_TYPES[dtype])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    if unknown is not None:
        w.add_unk_token_id(unknown)
    w.add_add_bos_token(bool(tok.add_bos))
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    for key, t in export_state_dict(model).items():
        array, raw = _tensor(t, dtype)
        w.add_tensor(gguf_tensor_name(key), array, raw_dtype=raw)  # byte shapes read back as logical ones
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
