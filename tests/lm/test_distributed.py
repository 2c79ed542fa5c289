"""lm/distributed.py in a single process: every helper is the identity, so a stage has one code
path (the 2-process behaviour is tested through torchrun in tests/pipeline/test_launch.py)."""
from __future__ import annotations

import torch

from lm import distributed


def test_one_process_is_rank_0_of_1_and_collectives_are_identities():
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard_indices(5) == [0, 1, 2, 3, 4]
    assert distributed.shard(["a", "b"]) == ["a", "b"]
    assert distributed.gather_shards(["a", "b"], 2) == ["a", "b"]
    assert distributed.all_reduce_sum(2.5) == 2.5 and distributed.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
    model = torch.nn.Linear(3, 2)
    assert distributed.wrap_ddp(model) is model and distributed.unwrap(model) is model
    model(torch.ones(1, 3)).sum().backward()
    before = model.weight.grad.clone()
    distributed.all_reduce_grads(model)
    assert torch.equal(model.weight.grad, before)
    distributed.barrier()


def test_cuda_ranks_take_the_gpu_of_their_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device("cuda") == "cuda:3" and distributed.local_device("cpu") == "cpu"


def test_one_process_trains_the_model_itself_through_a_loss_module():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    trainable = distributed.prepare_training(model, optimizer, shard=True)  # one process: nothing to shard
    assert trainable.optimizer is optimizer and not trainable.sharded and trainable.module.model is model

    def loss_fn(m, x):
        return m(x).square().sum()

    x = torch.ones(1, 3)
    assert torch.equal(trainable.module(loss_fn, x), loss_fn(model, x))
    assert distributed.as_loss_module(trainable.module) is trainable.module
    before = model.weight.detach().clone()
    trainable.module(loss_fn, x).backward()
    trainable.optimizer.step()
    trainable.sync_to(model, optimizer)  # nothing to gather: the weights are the model's own
    assert not torch.equal(model.weight, before)
