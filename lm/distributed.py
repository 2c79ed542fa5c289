"""Data parallelism on torch.distributed: what a stage needs to run as one of several ranks.

A stage launched through torchrun (`pipeline.launch`) runs its ordinary function on every rank;
the process group is already initialised. The stage code asks this module three kinds of things:

- Who am I: `rank()`, `world_size()`, `is_main()`; in a plain single process these are 0, 1, True
  and every collective below is a no-op, so a stage has one code path.
- Split and gather work: `shard(items)` gives this rank its share (round-robin: sorted work stays
  balanced), `gather_shards(mine, n)` puts every rank's results back in single-process order, on
  every rank; `all_reduce_sum` adds numbers across ranks.
- Train: `wrap_ddp` (DistributedDataParallel, as torchtune / TRL+accelerate do) or `shard_fsdp`
  (FSDP2's `fully_shard`) around a model; `all_reduce_grads` sums gradients for loops whose ranks
  may run different numbers of backward passes (GRPO), where DDP's per-backward hooks would hang.

Backends: gloo on CPU (what the tests run), NCCL on CUDA (one device per local rank; that path has
not been run here: no GPU on the development machine).
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

__all__ = ["init_from_env", "shutdown", "active", "rank", "world_size", "is_main", "barrier", "shard",
           "shard_indices", "gather_shards", "all_gather_objects", "all_reduce_sum", "all_reduce_grads",
           "wrap_ddp", "unwrap", "local_device"]


def init_from_env(device: str, timeout_s: float = 1800.0) -> str:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the env).

    Args:
        device: the run's device ("cpu", "cuda", "cuda:N"); CUDA ranks each take `cuda:LOCAL_RANK`.
    Returns:
        the device this rank works on.
    """
    dev = local_device(device)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if dev.startswith("cuda"):  # untested here (no GPU): one device per local rank, NCCL
        torch.cuda.set_device(torch.device(dev))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dev


def local_device(device: str) -> str:
    """The device of this rank: CUDA ranks take the GPU of their local rank, CPU stays CPU."""
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shard_indices(n: int) -> list[int]:
    """This rank's indices of range(n), round-robin (rank r takes r, r + W, r + 2W, ...)."""
    return list(range(rank(), n, world_size()))


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items` (see `shard_indices`)."""
    return [items[i] for i in shard_indices(len(items))]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable: our own lists of numbers and strings), indexed by rank.

    Only objects this process built travel (pickled by torch.distributed between ranks of one
    job), never user files or model output read from disk."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_shards(mine: Sequence[T], n: int) -> list[T]:
    """Undo `shard`: each rank passes the results of its `shard_indices(n)`, in that order; every
    rank gets all n results in index order (the order one process would have produced)."""
    if not active():
        return list(mine)
    parts = all_gather_objects(list(mine))
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        idx = range(r, n, len(parts))
        if len(part) != len(idx):
            raise RuntimeError(f"rank {r} returned {len(part)} results for {len(idx)} items")
        for i, item in zip(idx, part):
            out[i] = item
    return out


def all_reduce_sum(value: float | Sequence[float]) -> Any:
    """Sum numbers across ranks (float64); a float or a list of floats, like the input."""
    if not active():
        return value if isinstance(value, (int, float)) else list(value)
    scalar = isinstance(value, (int, float))
    t = torch.tensor([value] if scalar else list(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t[0]) if scalar else t.tolist()


def all_reduce_grads(model: nn.Module) -> None:
    """Sum the gradients of `model`'s trainable parameters across ranks, in one flat buffer.

    A rank whose share of a batch was empty contributes zeros (its missing gradients become zero
    tensors), so every rank joins the same collective however many backward passes it ran.
    """
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # [sum numel]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


class _DDP(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that also answers the wrapped model's own attributes (`config`,
    `logits`, `output_weight`), so loss functions written for a `Transformer` take it as is."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """`model` inside DistributedDataParallel when several ranks train it, else unchanged.

    Gradients are averaged over ranks by DDP; callers that want the single-process sum scale their
    loss by `world_size()`. Buffers are not re-broadcast every step (ours are constants)."""
    if not active():
        return model
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return _DDP(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _comm_device() -> torch.device:
    """Where small collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
