"""Llama-architecture GGUF files (llama.cpp's format) as r1flow models and tokenizers.

Where from: the GGUF spec (ggml `docs/gguf.md`) and llama.cpp's tensor and metadata names; the
`gguf` package (gguf-py) parses the file and dequantizes every type it knows (Q4_0, Q4_1, Q8_0,
K-quants, ...) to float32.

- Weights map one-to-one onto Meta's names (`blk.N.attn_q` -> `layers.N.attention.wq`). No q/k
  permutation is applied: llama.cpp's `convert_hf_to_gguf.py` already permutes Hugging Face's
  rotate-half q/k rows back into Meta's interleaved layout, which is what llama.cpp's "norm" rope
  and `lm.model.apply_rope` rotate (`tests/lm/test_gguf.py` checks this by logit parity with
  transformers, which un-permutes them for its own layout).
- ggml stores shapes fastest-dimension first (`ne = [in, out]`); the dequantized numpy arrays are
  row-major `[out, in]`, the PyTorch `nn.Linear` layout.
- No `output.weight` tensor means tied embeddings (SmolLM2).
- The tokenizer (`tokenizer.ggml.*`) becomes a tiktoken encoding through `lm.bpe_convert`; only
  byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.bpe_convert import GGUF_PRE_SPLITS, BPEConversionError, convert_byte_level_bpe, make_tokenizer
from lm.checkpoint import resolve_dtype
from lm.model import ModelConfig, ModelConfigError, Transformer, shape_mismatches
from lm.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (after "blk.N.") -> r1flow name (after "layers.N.").
_BLOCK_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_q.bias": "attention.wq.bias",
    "attn_k.weight": "attention.wk.weight",
    "attn_k.bias": "attention.wk.bias",
    "attn_v.weight": "attention.wv.weight",
    "attn_v.bias": "attention.wv.bias",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# llama.cpp token types (`llama_token_type`): these are matched whole in text, before splitting.
_CONTROL, _USER_DEFINED = 3, 4


class LoadError(ValueError):
    """A foreign checkpoint (GGUF, Hugging Face) r1flow cannot load, with the reason."""


class GGUFError(LoadError):
    """A GGUF file r1flow cannot load, with the reason."""


# --------------------------------------------------------------------------------------------------
# Reading


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A `gguf.GGUFReader` over `path`, with truncation and corruption reported as `GGUFError`."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise GGUFError(f"{path}: cannot parse as GGUF (truncated or corrupt file?): "
                        f"{type(e).__name__}: {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFError(f"{path}: truncated file: tensor {t.name!r} needs bytes up to {end} "
                            f"but the file has {size}")
    return reader


def field_value(reader: Any, key: str, default: Any = ...) -> Any:
    """The value of metadata `key`: str, int, float, bool or a list of them.

    Decoded from the raw parts so it works across gguf-py versions. A missing key raises
    `GGUFError` unless `default` is given.
    """
    import gguf

    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFError(f"GGUF metadata has no {key!r} field")
        return default
    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[-1] == gguf.GGUFValueType.STRING:
            return [_utf8(bytes(field.parts[i]), key) for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if types[0] == gguf.GGUFValueType.STRING:
        return _utf8(bytes(field.parts[field.data[0]]), key)
    value = field.parts[field.data[0]][0]
    return bool(value) if types[0] == gguf.GGUFValueType.BOOL else value.item()


def _utf8(raw: bytes, key: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GGUFError(f"GGUF field {key!r} holds a string that is not UTF-8: {e}") from None


def check_architecture(reader: Any) -> str:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture {arch!r}: r1flow loads {list(SUPPORTED_ARCHITECTURES)}")
    return arch


# --------------------------------------------------------------------------------------------------
# Config and weights


def gguf_model_config(reader: Any, max_seq_len: int | None = None) -> ModelConfig:
    """`ModelConfig` from the `llama.*` metadata (llama.cpp's `LLM_KV_*` keys).

    `max_seq_len` caps the context length (the rotary tables are sized by it); default: the file's
    `llama.context_length`.
    """
    arch = check_architecture(reader)

    def get(key: str, default: Any = ...) -> Any:
        return field_value(reader, f"{arch}.{key}", default)

    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size", None)
    if vocab is None:
        vocab = len(field_value(reader, "tokenizer.ggml.tokens"))
    context = _int(get("context_length"), f"{arch}.context_length")
    n_heads = _int(get("attention.head_count"), f"{arch}.attention.head_count")
    fields = {  # ModelConfig field -> (value, the GGUF key it came from)
        "vocab_size": (vocab, f"{arch}.vocab_size"),
        "dim": (get("embedding_length"), f"{arch}.embedding_length"),
        "n_layers": (get("block_count"), f"{arch}.block_count"),
        "n_heads": (n_heads, f"{arch}.attention.head_count"),
        "n_kv_heads": (get("attention.head_count_kv", n_heads), f"{arch}.attention.head_count_kv"),
        "ffn_dim": (get("feed_forward_length"), f"{arch}.feed_forward_length"),
        "max_seq_len": (min(context, max_seq_len) if max_seq_len else context, f"{arch}.context_length"),
    }
    try:  # every size is checked against sane bounds here, before anything is allocated
        cfg = ModelConfig(
            **{k: _int(v, key) for k, (v, key) in fields.items()},
            norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(get("rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in names,
            qkv_bias="blk.0.attn_q.bias" in names,
        )
    except ModelConfigError as e:
        key = fields[e.field][1] if e.field in fields else e.field
        raise GGUFError(f"GGUF metadata {key}: {e.reason}") from None
    except ValueError as e:  # embedding_length not divisible by head_count, ...
        raise GGUFError(f"GGUF metadata: {e}") from None
    head_dim = cfg.head_dim
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"partial rotary embeddings (rope.dimension_count {rope_dim} < head_dim "
                        f"{head_dim}) are not supported")
    if "rope_freqs.weight" in names or get("rope.scaling.type", "none") not in ("none", ""):
        raise GGUFError("RoPE frequency scaling (Llama 3.1-style rope_freqs / rope.scaling) is not supported")
    if get("attention.key_length", head_dim) != head_dim:
        raise GGUFError("attention.key_length differs from embedding_length / head_count: not supported")
    return cfg


def _int(value: Any, key: str) -> int:
    """A GGUF size field as an int; GGUFError naming the key if it is not a whole number."""
    try:
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise GGUFError(f"GGUF metadata {key}: must be an integer, got {value!r}") from None


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def r1flow_name(gguf_name: str) -> str:
    """The `Transformer` state-dict name of a GGUF tensor name."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    raise GGUFError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


def dequantize(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as float32 `[out, in]` (ggml's `ne` reversed)."""
    from gguf import quants

    try:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"tensor {tensor.name!r}: gguf cannot dequantize {tensor.tensor_type.name}: {e}") from e
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    array = np.asarray(array, dtype=np.float32).reshape(shape)
    if not array.flags.writeable:  # an F32 tensor is a view of the read-only memory map
        array = array.copy()
    return torch.from_numpy(array)


def gguf_state_dict(reader: Any, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized, cast to `dtype`, under r1flow's names."""
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = r1flow_name(t.name)
        layer = name.split(".")[1] if name.startswith("layers.") else None
        if layer is not None and int(layer) >= cfg.n_layers:
            raise GGUFError(f"tensor {t.name!r} is past block_count {cfg.n_layers}")
        sd[name] = dequantize(t).to(dtype)
    return sd


def load_gguf_model(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "fp32", max_seq_len: int | None = None) -> Transformer:
    """A `Transformer` holding the GGUF file's weights, dequantized, in eval mode.

    `dtype`: "fp32", "bf16", "fp16" or a torch dtype; "auto" is fp32 (what dequantization gives).
    """
    return gguf_model(open_gguf(path), device, dtype, max_seq_len, str(path))


def gguf_model(reader: Any, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
               max_seq_len: int | None = None, source: str = "gguf") -> Transformer:
    """`load_gguf_model` on an already opened reader (`source` names it in errors)."""
    cfg = gguf_model_config(reader, max_seq_len)
    # The tensor headers (ggml lists dims innermost first) against the config, before dequantizing.
    shapes = {r1flow_name(t.name): tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
    problems = shape_mismatches(cfg, shapes)
    if problems:
        raise GGUFError(f"{source}: tensors do not match the metadata: " + "; ".join(problems))
    cast = target_dtype(dtype, torch.float32)
    return build_model(cfg, gguf_state_dict(reader, cfg, cast), device, cast, source)


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], device: str | torch.device,
                dtype: torch.dtype, source: str) -> Transformer:
    """`Transformer(cfg)` holding `sd`, on `device` in `dtype`, in eval mode.

    Shared by the GGUF and Hugging Face loaders; a missing, extra or misshapen tensor is reported
    with its name. The tensors of `sd` are adopted as the parameters (`assign=True`), so the
    weights are not copied a second time.
    """
    problems = shape_mismatches(cfg, {k: tuple(t.shape) for k, t in sd.items()})
    if problems:  # checked before the model is built: a config that lies allocates nothing
        raise LoadError(f"{source}: tensors do not match the config: " + "; ".join(problems))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.to(device).eval()


def target_dtype(dtype: str | torch.dtype, auto: torch.dtype) -> torch.dtype:
    """The torch dtype to load into: `lm.checkpoint.resolve_dtype`'s names, "auto" -> `auto`."""
    return auto if dtype == "auto" else resolve_dtype(dtype)


def load_gguf(path: str | os.PathLike[str], device: str | torch.device = "cpu",
              dtype: str | torch.dtype = "fp32", max_seq_len: int | None = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a GGUF file, parsing it once."""
    reader = open_gguf(path)
    check_architecture(reader)
    tok = gguf_tokenizer(reader, name=Path(path).stem)  # first: tokenizer errors are the cheap ones
    model = gguf_model(reader, device, dtype, max_seq_len, str(path))
    if tok.vocab_size > model.config.vocab_size:
        raise GGUFError(f"{path}: the tokenizer has {tok.vocab_size} ids but the model only "
                        f"{model.config.vocab_size} embedding rows")
    return model, tok


# --------------------------------------------------------------------------------------------------
# Tokenizer


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer stored in a GGUF file."""
    return gguf_tokenizer(open_gguf(path), name=Path(path).stem)


def gguf_tokenizer(reader: Any, name: str = "gguf") -> Tokenizer:
    """The `tokenizer.ggml.*` metadata as a `Tokenizer` whose ids are the model's.

    Control and user-defined tokens become the Tokenizer's special tokens, matched whole before
    splitting (HF adds them as added tokens, llama.cpp matches them whole); `tokenizer.ggml.pre`
    picks the split regex; bos/eos/padding ids, `add_bos_token` and the chat template come along.
    """
    model_type = field_value(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise GGUFError(f"tokenizer.ggml.model is {model_type!r}: only byte-level BPE ('gpt2') is supported")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    merges = field_value(reader, "tokenizer.ggml.merges")
    types = field_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_SPLITS:
        raise GGUFError(f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; known: {sorted(GGUF_PRE_SPLITS)}")
    specials = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _USER_DEFINED)}
    vocab = {tok: i for i, tok in enumerate(tokens) if tok not in specials}
    try:
        bpe = convert_byte_level_bpe(name, vocab, merges, specials, GGUF_PRE_SPLITS[pre])
    except BPEConversionError as e:
        raise GGUFError(f"cannot convert the GGUF tokenizer: {e}") from e
    ids = {key: field_value(reader, f"tokenizer.ggml.{key}_token_id", None)
           for key in ("bos", "eos", "padding", "unknown")}
    if ids["eos"] is None:
        raise GGUFError("GGUF metadata has no 'tokenizer.ggml.eos_token_id' field")
    for key, value in ids.items():
        if value is not None and not 0 <= value < len(tokens):
            raise GGUFError(f"tokenizer.ggml.{key}_token_id {value} is outside the vocabulary")
    return make_tokenizer(bpe, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"], unknown_id=ids["unknown"],
                          add_bos=bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
                          chat_template=field_value(reader, "tokenizer.chat_template", None))
