"""Training components shared by the stages (composition, not a trainer class; STYLE.md 6).

- `make_optimizer`: AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, never on
  norms or biases (the GPT-2/nanoGPT grouping).
- `lr_at`: linear warmup then cosine decay to `min_ratio` of the peak (SGDR's cosine without
  restarts), as a multiplier; `set_lr` applies it.
- `clip_grad`: global-norm clipping; returns the pre-clip norm for logging.
- `check_finite` / `NonFiniteError`: stop with a clear error on a NaN/inf loss or gradient norm
  *before* the optimizer step or a checkpoint write, so the last good (atomically written)
  checkpoint stays the newest one on disk.
- Device and precision, one helper per decision: `resolve_device` ("auto" -> the best present),
  `resolve_dtype_name` ("auto" -> bf16 where the device does it natively), `training_precision`
  (what a training forward actually runs in), `autocast_context`, and `fast_fp32_matmul` (fp32 CPU
  matmuls through oneDNN where that stays fp32-exact). The pipeline's cache key, the stages and
  `r1flow generate` all call these, so a key never records a precision the stage did not run.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["make_optimizer", "lr_at", "set_lr", "clip_grad", "NonFiniteError", "check_finite", "autocast_context",
           "resolve_device", "resolve_dtype_name", "training_precision", "native_bf16", "fast_fp32_matmul",
           "onednn_fp32_exact"]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (norm weights, biases, DoRA
    magnitudes) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def lr_at(step: int, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at `step` (0-based).

    Linear warmup from 1/warmup to 1 over `warmup` steps, then cosine from 1 down to `min_ratio`
    at step `total` (and `min_ratio` after it).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad(parameters: Iterable[Tensor] | nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (<= 0: only measure); return the norm before."""
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor over the shards


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/inf; training stops and the last good checkpoint is kept."""


def check_finite(name: str, value: float | Tensor, step: int) -> None:
    """Raise `NonFiniteError` naming the quantity and step if `value` is NaN or inf."""
    v = float(value.detach().float().sum()) if isinstance(value, Tensor) else float(value)
    if not math.isfinite(v):
        raise NonFiniteError(f"{name} is {v} at step {step}; stopping before the optimizer step "
                             "(the last good checkpoint on disk is untouched)")


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when available, else "mps" when available, else "cpu"."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype_name(dtype: str, device: str) -> str:
    """"auto" -> "bf16" on a CUDA device that supports it, else "fp32"."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_context(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for mixed precision (weights stay fp32); a no-op for "fp32", and for
    "bf16" on a device without native bf16 (`native_bf16`): emulated bf16 is both slower and less
    exact than fp32 (measured: the tiny base stage over 3x slower on an AVX2-only CPU)."""
    if dtype in ("fp32", "float32") or (dtype == "bf16" and not native_bf16(device)):
        return contextlib.nullcontext()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=torch.device(device).type, dtype=torch_dtype)


def training_precision(device: str, dtype: str, autocast: bool) -> str:
    """"bf16" (autocast over fp32 master weights) when asked for, by `autocast` or a bf16 run, and
    the device does bf16 natively; else "fp32"."""
    return "bf16" if (autocast or dtype == "bf16") and native_bf16(device) else "fp32"


@functools.lru_cache(maxsize=None)
def native_bf16(device: str) -> bool:
    """Whether the device computes bf16 natively: CUDA with bf16, a CPU with AVX-512 BF16 / AMX."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


_ONEDNN_FP32: bool | None = None


def onednn_fp32_exact() -> bool:
    """Whether oneDNN computes fp32 matmuls at fp32 accuracy on this CPU (probed once).

    PyTorch sends fp32 CPU matmuls to MKL, whose kernels on AMD CPUs are its AVX2 ones; oneDNN's
    are AVX-512 (measured 81 vs 194 GFLOP/s single-threaded at the tiny model's shapes on the
    reference AMD EPYC). The only switch that routes fp32 matmuls to oneDNN is
    `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, which *permits* bf16 internally; on
    CPUs without bf16 matrix units oneDNN still computes in fp32. The probe compares both modes
    against a float64 product and accepts oneDNN only when its error stays at fp32 level (a bf16
    downcast would be ~1000x larger), so a CPU that would really downcast keeps MKL.
    """
    global _ONEDNN_FP32
    if _ONEDNN_FP32 is None:
        _ONEDNN_FP32 = _probe_onednn()
    return _ONEDNN_FP32


def _probe_onednn() -> bool:
    mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if mm is None or not hasattr(mm, "fp32_precision") or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, dtype=torch.float64, generator=g)  # [64, 512]
    w = torch.randn(128, 512, dtype=torch.float64, generator=g)  # [128, 512]
    ref = x @ w.T  # [64, 128]
    old = mm.fp32_precision
    errors = {}
    try:
        for mode in ("ieee", "bf16"):
            mm.fp32_precision = mode
            errors[mode] = float((torch.nn.functional.linear(x.float(), w.float()).double() - ref).abs().mean())
    except (RuntimeError, ValueError):
        return False
    finally:
        mm.fp32_precision = old
    return errors["bf16"] <= 4 * errors["ieee"] + 1e-7


@contextmanager
def fast_fp32_matmul(device: str, dtype: str) -> Iterator[None]:
    """Route fp32 CPU matmuls (forward and backward) to oneDNN while inside, when
    `onednn_fp32_exact()`; restores the previous setting on exit. Generation stays outside: at its
    32-row matmuls oneDNN's per-call overhead made decoding slower."""
    if torch.device(device).type != "cpu" or dtype != "fp32" or not onednn_fp32_exact():
        yield
        return
    mm = torch.backends.mkldnn.matmul
    old = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = old
