"""Data parallelism on torch.distributed: what a stage needs to run as one of several ranks.

A stage launched through torchrun (`pipeline.launch`) runs its ordinary function on every rank;
the process group is already initialised. The stage code asks this module three kinds of things:

- Who am I: `rank()`, `world_size()`, `is_main()`; in a plain single process these are 0, 1, True
  and every collective below is a no-op, so a stage has one code path.
- Split and gather work: `shard(items)` gives this rank its share (round-robin: sorted work stays
  balanced), `gather_shards(mine, n)` puts every rank's results back in single-process order, on
  every rank; `all_reduce_sum` adds numbers across ranks.
- Train: `prepare_training` gives the loop a `Trainable`: the model inside a `LossModule` (so
  every use of the weights, the vocabulary projection the loss functions make outside
  `model.forward` included, happens inside one forward call), wrapped in DistributedDataParallel
  (as torchtune / TRL+accelerate do) or, with `shard=True`, a copy sharded by FSDP2's
  `fully_shard` (parameters, gradients and AdamW moments split across ranks, as torchtune's
  full-finetune recipes do), with its own optimizer; `Trainable.sync_to` gathers the full weights
  and moments back into the caller's model and optimizer (for resume states and the final
  checkpoint, which keep the single-process format). `all_reduce_grads` sums gradients for loops
  whose ranks may run different numbers of backward passes (GRPO), where DDP's hooks would hang.

Backends: gloo on CPU (what the tests run), NCCL on CUDA (one device per local rank; that path has
not been run here: no GPU on the development machine).
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

__all__ = ["init_from_env", "shutdown", "active", "rank", "world_size", "is_main", "barrier", "shard",
           "shard_indices", "gather_shards", "all_gather_objects", "all_reduce_sum", "all_reduce_grads",
           "wrap_ddp", "unwrap", "local_device", "LossModule", "Trainable", "prepare_training", "grad_sync",
           "is_sharded"]


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


# --------------------------------------------------------------------------------------------------
# Training: one module per loss call, replicated (DDP) or sharded (FSDP2)


class LossModule(nn.Module):
    """`LossModule(model)(loss_fn, batch)` is `loss_fn(model, batch)` as the forward of one module.

    Loss functions project hidden states onto the vocabulary themselves (`lm.logprobs`, chunked),
    outside `model.forward`. Under FSDP a weight is only gathered inside a forward call, so the
    whole loss must be one; DDP and a single process take the same module, so a loop has one path.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any) -> torch.Tensor:
        return loss_fn(self.model, batch)


def as_loss_module(model: nn.Module) -> nn.Module:
    """A module to call as `module(loss_fn, batch)`: a `LossModule` (sharded or not) or a DDP
    around one as it is, a bare model inside a new `LossModule`."""
    if isinstance(model, LossModule) or (isinstance(model, nn.parallel.DistributedDataParallel)
                                         and isinstance(model.module, LossModule)):
        return model
    return LossModule(model)


def is_sharded(module: nn.Module) -> bool:
    """True for a module FSDP2's `fully_shard` has sharded."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def grad_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduction of the backward passes inside (all but a step's last
    micro-batch): DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`."""
    if enabled:
        yield
    elif isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


@dataclass
class Trainable:
    """What a training loop steps: `module(loss_fn, batch)` and `optimizer` over its parameters.

    Replicated (one process or DDP) these share the caller's model and optimizer. Sharded, they
    are a sharded copy and its own optimizer; `sync_to` writes their full state back.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    # sharded: (caller's parameter, its shard) for every parameter, by name
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return is_sharded(self.module)

    @torch.no_grad()
    def sync_to(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Gather the sharded weights and optimizer moments into the caller's `model` and
        `optimizer` (a collective: every rank calls it; all of them receive the full state)."""
        if not self.sharded:
            return
        for full, part in self.pairs:
            full.copy_(part.full_tensor())
            state = self.optimizer.state.get(part)
            if state:
                optimizer.state[full] = {k: _gathered(v) for k, v in state.items()}
        for mine, theirs in zip(optimizer.param_groups, self.optimizer.param_groups):
            mine.update({k: v for k, v in theirs.items() if k != "params"})


def prepare_training(model: nn.Module, optimizer: torch.optim.Optimizer, *, shard: bool = False) -> Trainable:
    """The `Trainable` for `model` and its `optimizer` on this rank.

    One process: `LossModule(model)` and the same optimizer. Several ranks: DDP around it, or with
    `shard` a deep copy whose transformer blocks and the rest are each `fully_shard`ed (FSDP2),
    an optimizer of the same class and groups over the shards, and the optimizer's state so far
    (a resumed run's moments) cut into the same shards. Gradients are averaged over ranks either
    way, so a loop that wants the single-process sum scales its loss by `world_size()`.
    """
    if not active():
        return Trainable(LossModule(model), optimizer)
    if not shard:
        return Trainable(wrap_ddp(LossModule(model)), optimizer)
    from torch.distributed.fsdp import fully_shard

    root = LossModule(copy.deepcopy(model))
    for block in getattr(root.model, "layers", []):  # one all-gather per block, as torchtune shards
        fully_shard(block)
    fully_shard(root)
    shards = dict(root.model.named_parameters())
    pairs = [(p, shards[n]) for n, p in model.named_parameters()]
    twin = {id(full): part for full, part in pairs}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [twin[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    sharded_optimizer = type(optimizer)(groups)
    for full, part in pairs:  # a resumed run: carry its moments over, cut like the parameters
        state = optimizer.state.get(full)
        if state:
            sharded_optimizer.state[part] = {k: _cut_like(v, part) for k, v in state.items()}
    return Trainable(root, sharded_optimizer, pairs)


def _cut_like(value: Any, part: Any) -> Any:
    """An optimizer state entry for the shard `part` (a DTensor sharded on dim 0, as `fully_shard`
    leaves it): tensors of the parameter's shape (moments) are cut into this rank's rows, as
    `torch.chunk` cuts them for FSDP2; anything else (the step count) is copied."""
    if not isinstance(value, torch.Tensor):
        return value
    if tuple(value.shape) != tuple(part.shape):
        return value.clone()
    from torch.distributed.tensor import DTensor, Shard

    local = part.to_local()
    if tuple(part.placements) != (Shard(0),):
        raise NotImplementedError(f"optimizer state for a parameter placed as {part.placements}")
    pieces = torch.chunk(value, part.device_mesh.size(), dim=0)
    mine = pieces[rank()] if rank() < len(pieces) else value[:0]
    if tuple(mine.shape) != tuple(local.shape):
        raise RuntimeError(f"rank {rank()}: a moment cut to {tuple(mine.shape)}, its parameter shard is {tuple(local.shape)}")
    return DTensor.from_local(mine.to(local.device, copy=True).contiguous(), part.device_mesh, part.placements,
                              run_check=False, shape=part.shape, stride=part.stride())


def _gathered(value: Any) -> Any:
    """An optimizer state entry back in full: a DTensor gathered from every rank, a tensor copied."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    return value.clone() if isinstance(value, torch.Tensor) else value
