"""A decoder-only Llama-architecture transformer in one readable file.

Where from: Meta's llama3 `llama/model.py` (pre-norm RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU feed-forward) with nanoGPT's layout of "config dataclass, then the blocks top to
bottom". Parameter names follow Meta's checkpoints exactly (`tok_embeddings`, `layers.{i}.attention.wq`,
`feed_forward.w1`, ...), so Meta and GGUF weights load without renaming.

Departures from Meta's file, and why:
- Rotary embeddings use Meta's *interleaved* layout (dimension pairs (0,1), (2,3), ... rotate
  together; llama.cpp calls it "norm" rope) and Meta's complex multiplication (one kernel, which
  measured faster on CPU than real cos/sin arithmetic); bf16 inputs rotate in fp32.
- The KV cache is an object (`KVCache`) passed into `forward`, not module state (nanochat's
  `engine.py`): it is preallocated once per batch, written in place, and reset between rollouts.
- `forward` takes per-sequence `positions` and a `key_mask`, so one batch can hold left-padded
  prompts of different lengths; without padding it uses SDPA's `is_causal` fast path.
- Grouped-query attention uses SDPA's `enable_gqa` rather than materialising repeated keys/values
  (`repeat_kv`); measured on CPU it is also faster than folding query groups into the time axis.
- `Transformer.fused_inference()` snapshots the weights for the length of a generation: q/k/v and
  gate/up concatenated (fewer, larger matmuls per decoded token) and, on CPU, pre-packed for
  oneDNN (about 2x faster than MKL at decoding shapes). Training always uses the plain modules,
  so the parameters, their names and LoRA wrapping are untouched.
- `forward(..., packed=real)` skips padding: embeddings, norms, projections and the feed-forward
  run on the real tokens only ([n, D], the "unpadded" layout of FlashAttention's varlen path),
  and only attention sees the padded [B, T] layout. Trainers use it when padding is a large share
  of a batch (GRPO's completions padded to the longest one).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------
# Config


class ModelConfigError(ValueError):
    """A model config field that cannot describe a model r1flow builds; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


# Sane upper bounds of the size fields. Every loader (r1flow checkpoints, Hugging Face, GGUF) builds a
# `ModelConfig` from untrusted metadata, and the rotary table and modules are sized from it, so a
# field is checked here, before anything is allocated; then `param_shapes` is compared with the
# tensors actually in the file. The bounds sit well above today's open models (vocab 256k, d 16k,
# 126 layers, 128 heads, ffn 53k, 128k context: 256k context fits, a 1M-context model loads with
# the loaders' `max_seq_len` cap).
SIZE_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 22, "dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
    "ffn_dim": 1 << 18, "max_seq_len": 1 << 18,
}


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder.

    `vocab_size` in the presets is a placeholder: replace it with the tokenizer's size,
    `dataclasses.replace(MODEL_PRESETS["tiny"], vocab_size=tok.vocab_size)`.
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    tie_embeddings: bool = True
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelConfigError(name, f"must be an integer, got {value!r}")
            if not 1 <= value <= limit:
                raise ModelConfigError(name, f"{value} is out of range (1..{limit})")
        for name, low, high in (("norm_eps", 0.0, 1.0), ("rope_theta", 0.0, 1e12)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
                raise ModelConfigError(name, f"must be a number in ({low:g}, {high:g}), got {value!r}")
        for name in ("tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelConfigError(unknown[0], f"unknown ModelConfig keys {unknown}; known keys are {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ModelConfigError(missing[0], f"ModelConfig is missing required keys {missing}")
        return cls(**d)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every state_dict key of `Transformer(self)` with its shape, by arithmetic (nothing built).

        Loaders compare these with the tensors in a file before building a model.
        """
        hd, D = self.head_dim, self.dim
        shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (self.vocab_size, D), "norm.weight": (D,)}
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "attention.wq.weight": (self.n_heads * hd, D),
                p + "attention.wk.weight": (self.n_kv_heads * hd, D),
                p + "attention.wv.weight": (self.n_kv_heads * hd, D),
                p + "attention.wo.weight": (D, self.n_heads * hd),
                p + "feed_forward.w1.weight": (self.ffn_dim, D),
                p + "feed_forward.w2.weight": (D, self.ffn_dim),
                p + "feed_forward.w3.weight": (self.ffn_dim, D),
                p + "attention_norm.weight": (D,),
                p + "ffn_norm.weight": (D,),
            })
            if self.qkv_bias:
                shapes.update({p + "attention.wq.bias": (self.n_heads * hd,),
                               p + "attention.wk.bias": (self.n_kv_heads * hd,),
                               p + "attention.wv.bias": (self.n_kv_heads * hd,)})
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, D)
        return shapes


    def num_params(self) -> int:
        """Parameter count of `Transformer(self)` without building it."""
        hd = self.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * hd
        attn = self.dim * qkv_out + self.n_heads * hd * self.dim + (qkv_out if self.qkv_bias else 0)
        ffn = 3 * self.dim * self.ffn_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim


def shape_mismatches(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How the tensors of a file (name -> shape) differ from what `cfg` declares; [] if they fit.

    Named by config field where one explains it (a layer count, the vocabulary, the width).
    """
    want = cfg.param_shapes()
    problems = []
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.") and k.split(".")[1].isdigit()}
    if len(layers) != cfg.n_layers:
        problems.append(f"n_layers: config says {cfg.n_layers}, the file holds {len(layers)} layers")
    emb = shapes.get("tok_embeddings.weight")
    if emb is not None and len(emb) == 2 and emb != (cfg.vocab_size, cfg.dim):
        problems.append(f"vocab_size/dim: config says ({cfg.vocab_size}, {cfg.dim}), "
                        f"the file's embedding is {tuple(emb)}")
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    if missing:
        problems.append(f"missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} for this config")
    for name in sorted(set(want) & set(shapes)):
        if tuple(shapes[name]) != want[name]:
            problems.append(f"tensor {name!r} has shape {tuple(shapes[name])}, expected {want[name]}")
            break
    return problems


# Placeholder vocab 512: the tokenizer's size replaces it. "tiny" is the embedded default teacher
# and the bench/sampler.py shape; "tiny-student" stays under a third of tiny for vocabularies up to
# ~4k tokens; "smollm2-135m" is HuggingFaceTB/SmolLM2-135M's real shape. The from-scratch presets
# untie the output projection: tied, a corpus whose question digits are random (uniform targets)
# kept the tiny model from learning even to copy digits (a copy task stayed at loss 0.89 for 200
# steps tied, learned untied), for 512 x dim extra parameters.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "micro": ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=256,
                         max_seq_len=512, tie_embeddings=False),
    "tiny": ModelConfig(vocab_size=512, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704,
                        max_seq_len=1024, tie_embeddings=False),
    "tiny-student": ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                ffn_dim=384, max_seq_len=1024, tie_embeddings=False),
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                                tie_embeddings=True),
}


# --------------------------------------------------------------------------------------------------
# KV cache


class Cache(Protocol):
    """What `Transformer.forward` asks of a cache: `pos` keys/values are already held; `update`
    takes layer `layer`'s new keys/values ([B, Hkv, T, hd]) and returns every key/value the
    queries may attend to ([B, Hkv, S, hd]); `advance(T)` after the last layer. `KVCache` is the
    preallocated decoding cache; `lm.logprobs.PromptKV` / `SharedPrefixKV` let G completions
    attend to a prompt computed once."""

    pos: int

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]: ...

    def advance(self, n: int) -> None: ...


class KVCache:
    """Keys and values of every layer for one batch, allocated once and written in place.

    Layout `[n_layers, batch, n_kv_heads, max_len, head_dim]`. All sequences share the write
    position `pos` (prompts are left-padded to a common length), so one slice assignment per layer
    stores a step for the whole batch; no tensor is concatenated or reallocated while decoding.
    `Transformer.forward` writes layer by layer and advances `pos` after its last layer.
    `keep_rows` drops finished sequences: the cache then serves the first `rows` of its batch.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, hd]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, S, hd]
        self.pos = 0
        self.rows = batch_size  # the live rows: the first `rows` of the batch

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_len: int, *,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim,
                   dtype=dtype, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reset(self) -> None:
        """Forget the contents; stale values past `pos` are never read, so no zeroing is needed."""
        self.pos = 0
        self.rows = self.batch_size

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store `k, v` ([rows, Hkv, T, hd]) at `pos` and return views of all keys/values so far."""
        end, n = self.pos + k.shape[2], self.rows
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[layer, :n, :, self.pos:end] = k
        self.v[layer, :n, :, self.pos:end] = v
        return self.k[layer, :n, :, :end], self.v[layer, :n, :, :end]  # [rows, Hkv, end, hd] each

    def keep_rows(self, rows: Tensor) -> None:
        """Keep only the live rows `rows` ([n] ascending indices), moved to the front of the batch:
        one copy of their `pos` cached positions, after which each step reads and writes n rows."""
        end = self.pos
        self.k[:, :len(rows), :, :end] = self.k[:, rows, :, :end]  # [L, n, Hkv, pos, hd]
        self.v[:, :len(rows), :, :end] = self.v[:, rows, :, :end]
        self.rows = len(rows)

    def advance(self, n: int) -> None:
        self.pos += n


# --------------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32 like Meta's."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # [..., D]
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).type_as(x)  # [..., D]
        return y * self.weight


def rope_table(head_dim: int, max_len: int, theta: float) -> Tensor:
    """e^(i * pos * theta^(-2j/head_dim)) for every position and pair j: Meta's precompute_freqs_cis.

    Returns a complex64 tensor [max_len, head_dim/2] (angles computed in float64, then rounded).
    """
    cpu = torch.device("cpu")  # explicit, so building the model under `torch.device("meta")` works
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=cpu) / head_dim))  # [hd/2]
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64, device=cpu), inv_freq)  # [S, hd/2]
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # [S, hd/2]


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by their position's angle: one complex multiply.

    x: [B, T, H, hd]; freqs: complex [B|1, T, 1, hd/2] (already gathered at each token's position).
    Pairs are read as complex numbers x[2j] + i x[2j+1], exactly Meta's apply_rotary_emb.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, H, hd/2] complex
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)  # [B, T, H, hd]


# Below this many scores per head (T x S), masked fp32 attention on CPU runs as two batched matmuls.
BMM_ATTENTION_MAX_SCORES = 1 << 15


def _prefer_bmm_attention(q: Tensor, k: Tensor) -> bool:
    """Whether `grouped_attention` beats SDPA here: on CPU with an explicit mask, torch's flash
    kernel (its backward most) is slow at short lengths; the GRPO benchmark's policy pass took
    0.25 s with it and 0.18 s without. Large T x S keeps SDPA, which never holds the scores."""
    return (q.device.type == "cpu" and q.dtype == torch.float32
            and q.shape[2] * k.shape[2] <= BMM_ATTENTION_MAX_SCORES)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(hd) + mask) v with grouped key/value heads, as two batched matmuls.

    The G = H / Hkv query heads sharing a key/value head are stacked along the query axis, so keys
    and values are never repeated. q: [B, H, T, hd]; k, v: [B, Hkv, S, hd]; mask: bool
    [B|1, 1, T, S], True = may attend (every row needs one True). Returns [B, H, T, hd].
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    bias = bias.expand(B, 1, T, S).unsqueeze(2).expand(B, Hkv, G, T, S)  # [B, Hkv, G, T, S]
    scores = torch.baddbmm(bias.reshape(B * Hkv, G * T, S), q.reshape(B * Hkv, G * T, hd),
                           k.reshape(B * Hkv, S, hd).transpose(1, 2), alpha=hd ** -0.5)  # [B Hkv, G T, S]
    y = torch.bmm(scores.softmax(dim=-1), v.reshape(B * Hkv, S, hd))  # [B Hkv, G T, hd]
    return y.view(B, H, T, hd)


class InferenceLinear:
    """y = x W^T + b for generation, W the concatenation of one or more `nn.Linear` weights.

    On CPU the weight is re-laid out once into oneDNN's blocked format for `batch_size` rows
    (`torch.ops.mkldnn`, the path torch.compile's CPU backend uses): at decoding shapes (32 rows,
    d 256) it measured about 2x faster than `F.linear`'s MKL sgemm, with the same fp32 accuracy
    (different summation order only). Anywhere else, or if oneDNN is unavailable, it is
    `F.linear`. A snapshot: build it after the last weight update, drop it before the next.
    """

    use_onednn: bool = True  # class-wide switch (tests compare both paths)

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None], batch_size: int) -> None:
        w = torch.cat(weights).detach()  # [sum(out), in]
        has_bias = any(b is not None for b in biases)
        self.bias = torch.cat([b if b is not None else w_.new_zeros(w_.shape[0]) for w_, b in zip(weights, biases)]
                              ).detach() if has_bias else None  # [sum(out)]
        self.weight = w
        self.packed = self._pack(w, batch_size) if self.use_onednn else None

    def _pack(self, w: Tensor, batch_size: int) -> Tensor | None:
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) \
                or not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, max(1, batch_size))
            probe = torch.zeros(1, w.shape[1], dtype=w.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
        return packed

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # [..., out]
        return F.linear(x, self.weight, self.bias)  # [..., out]


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): n_kv_heads key/value heads shared by groups
    of n_heads / n_kv_heads query heads (MHA when equal, MQA when 1)."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # (q/k/v concatenated, wo) while inside Transformer.fused_inference, else None
        self.fast: tuple[InferenceLinear, InferenceLinear] | None = None

    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor | None, is_causal: bool,
                cache: Cache | None, layout: Packing | None = None) -> Tensor:
        """x: [B, T, D], or [n, D] real tokens only with `layout` (then returns [n, D])."""
        B, T = (layout.B, layout.T) if layout is not None else x.shape[:2]
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        wo = self.wo if self.fast is None else self.fast[1]
        pad = layout.unpack if layout is not None else (lambda t: t)  # [n, F] -> [B, T, F]
        if self.fast is not None:  # one matmul, and one rotation for q and k together
            qkv = pad(self.fast[0](x)).view(B, T, H + 2 * Hkv, hd)  # [B, T, H + 2 Hkv, hd]
            qk = apply_rope(qkv[:, :, :H + Hkv], freqs)  # [B, T, H + Hkv, hd]
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]  # [B, T, H|Hkv|Hkv, hd]
        else:
            q = apply_rope(pad(self.wq(x)).view(B, T, H, hd), freqs)  # [B, T, H, hd]
            k = apply_rope(pad(self.wk(x)).view(B, T, Hkv, hd), freqs)  # [B, T, Hkv, hd]
            v = pad(self.wv(x)).view(B, T, Hkv, hd)  # [B, T, Hkv, hd]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|Hkv, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # [B, Hkv, S, hd] each
        if mask is not None and T > 1 and _prefer_bmm_attention(q, k):
            y = grouped_attention(q, k, v, mask)  # [B, H, T, hd]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=H != Hkv)  # [B, H, T, hd]
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # [B, T, H hd]
        return wo(y if layout is None else layout.pack(y))  # [B, T, D] or [n, D]


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        # (w1/w3 concatenated, w2) while inside Transformer.fused_inference, else None
        self.fast: tuple[InferenceLinear, InferenceLinear] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.fast is not None:
            gate, up = self.fast[0](x).chunk(2, dim=-1)  # [B, T, F] each
            return self.fast[1](F.silu(gate) * up)  # [B, T, D]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # [B, T, D]


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor | None, is_causal: bool,
                cache: Cache | None, layout: Packing | None = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), freqs, mask, is_causal, cache, layout)  # [B, T, D] | [n, D]
        return x + self.feed_forward(self.ffn_norm(x))  # [B, T, D] | [n, D]


@dataclass
class Packing:
    """Where a batch's real tokens sit: `index` [n] into the flattened [B, T] positions, ascending."""

    B: int
    T: int
    index: Tensor

    @classmethod
    def of(cls, real: Tensor) -> "Packing":
        B, T = real.shape
        return cls(B, T, real.reshape(-1).nonzero().squeeze(1))  # [n]

    def pack(self, x: Tensor) -> Tensor:
        """[B, T, F] -> [n, F], the real positions."""
        return x.reshape(self.B * self.T, -1).index_select(0, self.index)  # [n, F]

    def unpack(self, x: Tensor) -> Tensor:
        """[n, F] -> [B, T, F], zeros on padding."""
        out = x.new_zeros(self.B * self.T, x.shape[-1])  # [B T, F]
        return out.index_copy(0, self.index, x).view(self.B, self.T, -1)  # [B, T, F]


# --------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """Llama decoder: embeddings → n_layers × (attention, SwiGLU) pre-norm blocks → norm → logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.fast_output: InferenceLinear | None = None  # set inside fused_inference
        self._kept_fused: tuple[Any, Any] | None = None  # (key, projections) from fused_inference(keep=True)
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` would cast a complex buffer to
        # a real one. It follows the model's device lazily in `forward`.
        self.rope_freqs = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # [S, hd/2] complex64
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/nanoGPT init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def output_weight(self) -> Tensor:
        """The vocabulary projection [vocab, dim] (the embedding matrix when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, h: Tensor) -> Tensor:
        """Project normed hidden states [..., D] to logits [..., V]."""
        if self.fast_output is not None:
            return self.fast_output(h)  # [..., V]
        return F.linear(h, self.output_weight)  # [..., V]

    @contextmanager
    def fused_inference(self, batch_size: int = 1, *, keep: bool = False) -> Iterator[None]:
        """For the duration of the block, run the projections through `InferenceLinear`s.

        q/k/v become one matmul (and q and k one rotation), gate/up one matmul, and on CPU every
        projection (and the vocabulary projection used by `logits`) uses weights pre-packed for
        `batch_size` rows. Wrap a generation, never training (refused while autograd is on).
        Projections wrapped by adapters (lm/lora.py) are not plain `nn.Linear`s and stay as they are.

        By default the packed copies are made on entry and dropped on exit, so nothing can go
        stale. `keep=True` is for frozen weights (a reference or teacher model, a model under
        evaluation): the copies outlive the block and the next `keep=True` block reuses them while
        every parameter is the same tensor at the same version (`Tensor._version`, which every
        in-place update bumps: optimizer steps, `load_state_dict`, `p.mul_` under no_grad) and the
        batch size rounds up to the same power of two. Packing costs ~0.35 s per call for
        SmolLM2-135M on 2 cores, paid once instead of per batch/step. Writes through `.data` bypass
        the version counter: call `drop_fused()` after those. The kept copy costs the model's size.
        """
        if torch.is_grad_enabled():
            raise RuntimeError("fused_inference is for no-grad/inference-mode generation only")
        if keep:
            hint = 1 << max(0, batch_size - 1).bit_length()
            key = (hint, tuple((p.data_ptr(), p._version) for p in self.parameters()))
            if self._kept_fused is None or self._kept_fused[0] != key:
                self._kept_fused = None  # free the stale copy before packing the new one
                self._kept_fused = (key, self._fused_projections(hint))
            fused = self._kept_fused[1]
        else:
            self._kept_fused = None
            fused = self._fused_projections(batch_size)
        layer_fast, output = fused
        try:
            for layer, (attn_fast, ffn_fast) in zip(self.layers, layer_fast):
                layer.attention.fast, layer.feed_forward.fast = attn_fast, ffn_fast
            self.fast_output = output
            yield
        finally:
            for layer in self.layers:
                layer.attention.fast = None
                layer.feed_forward.fast = None
            self.fast_output = None

    def drop_fused(self) -> None:
        """Free the packed projections kept by `fused_inference(keep=True)`."""
        self._kept_fused = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the kept packed weights behind (oneDNN's opaque tensors cannot
        be copied; the copy repacks on its first `fused_inference`)."""
        return {**super().__getstate__(), "_kept_fused": None}

    def _fused_projections(self, batch_size: int) -> tuple[list[tuple[Any, Any]], InferenceLinear | None]:
        """Per layer ((q/k/v, wo) or None, (gate/up, down) or None), and the vocabulary projection."""

        def linear(*ms: nn.Module) -> InferenceLinear | None:
            if any(type(m) is not nn.Linear for m in ms):
                return None
            return InferenceLinear([m.weight for m in ms], [m.bias for m in ms], batch_size)

        layer_fast = []
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            qkv, wo = linear(attn.wq, attn.wk, attn.wv), linear(attn.wo)
            w13, w2 = linear(ffn.w1, ffn.w3), linear(ffn.w2)
            layer_fast.append(((qkv, wo) if qkv is not None and wo is not None else None,
                               (w13, w2) if w13 is not None and w2 is not None else None))
        if self.output is None:
            output = InferenceLinear([self.tok_embeddings.weight], [None], batch_size)
        else:
            output = linear(self.output)
        return layer_fast, output

    def forward(self, tokens: Tensor, *, positions: Tensor | None = None, key_mask: Tensor | None = None,
                cache: Cache | None = None, return_hidden: bool = False, packed: Tensor | None = None) -> Tensor:
        """Logits (or final normed hidden states) for `tokens`.

        Args:
            tokens: [B, T] token ids.
            positions: [B, T] rotary position of each token; default `cache.pos + arange(T)` (or
                `arange(T)` without a cache). Left-padded rows start their real tokens at 0.
            key_mask: [B, S] bool, True for real (non-padding) tokens over every key position the
                queries can see: S = T without a cache, `cache.pos + T` with one. None = no padding.
            cache: a `Cache` (the decoding `KVCache`, or a shared-prefix one); this step's
                keys/values are handed to it at `cache.pos`, which then advances by T.
            return_hidden: return the final normed hidden states [B, T, D] instead of logits, so
                callers can project only the rows or vocabulary chunks they need.
            packed: [B, T] bool, the real tokens of this block (a subset of `key_mask`'s last T
                columns): only they run through the embeddings, norms, projections and feed-forward
                ([n, D]); padding positions come back as zeros (their states are never used).

        Returns:
            [B, T, V] logits, or [B, T, D] hidden states with `return_hidden`.
        """
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        if self.rope_freqs.device != tokens.device:
            self.rope_freqs = self.rope_freqs.to(tokens.device)
        if positions is None:
            if start + T > self.config.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len {self.config.max_seq_len}")
            freqs = self.rope_freqs[start:start + T].view(1, T, 1, -1)  # [1, T, 1, hd/2]
        else:
            freqs = self.rope_freqs[positions].unsqueeze(2)  # [B, T, 1, hd/2]
        mask, is_causal = self._attention_mask(T, start, key_mask, tokens.device)
        layout = Packing.of(packed) if packed is not None else None
        x = self.tok_embeddings(tokens if layout is None else tokens.reshape(-1)[layout.index])  # [B, T, D] | [n, D]
        for layer in self.layers:
            x = layer(x, freqs, mask, is_causal, cache, layout)  # [B, T, D] | [n, D]
        if cache is not None:
            cache.advance(T)
        h = self.norm(x)  # [B, T, D] | [n, D]
        if layout is not None:
            h = layout.unpack(h)  # [B, T, D]
        return h if return_hidden else self.logits(h)  # [B, T, D] or [B, T, V]

    @staticmethod
    def _attention_mask(T: int, start: int, key_mask: Tensor | None,
                        device: torch.device) -> tuple[Tensor | None, bool]:
        """The SDPA mask for T queries at absolute positions start..start+T-1 over start+T keys.

        Returns (mask, is_causal): no mask at all when nothing needs hiding (a decoding step
        without padding, or SDPA's is_causal fast path for a fresh causal block); otherwise a bool
        [B|1, 1, T, S] mask. A padded query row still sees itself, so no softmax row is empty and
        no NaN can leak into later layers through the pads' keys and values.
        """
        S = start + T
        if key_mask is not None and key_mask.shape[-1] != S:
            raise ValueError(f"key_mask covers {key_mask.shape[-1]} positions, expected {S}")
        if T == 1:  # a decoding step: its (real) token sees every earlier real key
            return (None if key_mask is None else key_mask.view(-1, 1, 1, S)), False
        if key_mask is None and start == 0:
            return None, True
        q_pos = torch.arange(start, S, device=device).unsqueeze(1)  # [T, 1]
        k_pos = torch.arange(S, device=device).unsqueeze(0)  # [1, S]
        causal = k_pos <= q_pos  # [T, S]
        if key_mask is None:
            return causal.view(1, 1, T, S), False
        mask = causal & key_mask[:, None, None, :]  # [B, 1, T, S]
        return mask | (k_pos == q_pos), False  # [B, 1, T, S]
