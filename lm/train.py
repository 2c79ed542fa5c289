"""Training components shared by the stages (composition, not a trainer class; STYLE.md 6).

- `make_optimizer`: AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, never on
  norms or biases (the GPT-2/nanoGPT grouping).
- `lr_at`: linear warmup then cosine decay to `min_ratio` of the peak (SGDR's cosine without
  restarts), as a multiplier; `set_lr` applies it.
- `clip_grad`: global-norm clipping; returns the pre-clip norm for logging.
- `micro_batches` / `accumulation_weight`: gradient accumulation over micro-batches whose losses are
  weighted by their share of the batch, so the summed gradient equals the full-batch gradient.
- `check_finite` / `NonFiniteError`: stop with a clear error on a NaN/inf loss or gradient norm
  *before* the optimizer step or a checkpoint write, so the last good (atomically written)
  checkpoint stays the newest one on disk.
- `autocast_context`, `resolve_device`, `resolve_dtype_name`, `seed_everything`.
"""
from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["make_optimizer", "lr_at", "set_lr", "clip_grad", "micro_batches", "accumulation_weight",
           "NonFiniteError", "check_finite", "autocast_context", "resolve_device", "resolve_dtype_name",
           "seed_everything"]


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
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def micro_batches(n: int, micro_batch_size: int) -> Iterator[slice]:
    """Slices covering range(n) in micro-batches of at most `micro_batch_size` rows."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    for start in range(0, n, micro_batch_size):
        yield slice(start, min(n, start + micro_batch_size))


def accumulation_weight(part: slice | int, total: int) -> float:
    """Weight of a micro-batch's *mean* loss so that summing the weighted losses' gradients equals
    the gradient of the mean loss over the whole batch: rows_in_part / total."""
    rows = part.stop - part.start if isinstance(part, slice) else part
    return rows / total


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
    """bf16/fp16 autocast for mixed precision (weights stay fp32); a no-op for "fp32"."""
    if dtype in ("fp32", "float32"):
        return contextlib.nullcontext()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=torch.device(device).type, dtype=torch_dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
