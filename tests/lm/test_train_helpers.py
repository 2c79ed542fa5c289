"""Shared training components: schedule, optimizer groups, clipping, accumulation, finite guard."""
from __future__ import annotations

import math

import pytest
import torch

from lm.train import (NonFiniteError, accumulation_weight, autocast_context, check_finite, clip_grad, lr_at,
                      make_optimizer, micro_batches, resolve_device, resolve_dtype_name, set_lr)


def test_lr_schedule_by_hand():
    # warmup 4: steps 0..3 -> 1/4, 2/4, 3/4, 4/4
    assert [lr_at(s, 4, 14, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # cosine over the 10 steps after warmup: start 1.0, midpoint 0.1 + 0.9 * 0.5 = 0.55, end 0.1
    assert lr_at(4, 4, 14, 0.1) == pytest.approx(1.0)
    assert lr_at(9, 4, 14, 0.1) == pytest.approx(0.55)
    assert lr_at(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert lr_at(100, 4, 14, 0.1) == pytest.approx(0.1)
    assert lr_at(0, 0, 10, 0.0) == pytest.approx(1.0)


def test_optimizer_groups_skip_decay_on_norms_and_biases(make_model):
    model = make_model(qkv_bias=True)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_norms = 2 * model.config.n_layers + 1
    n_bias = 3 * model.config.n_layers
    assert len(no_decay["params"]) == n_norms + n_bias
    set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_clip_grad_returns_pre_clip_norm():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    assert clip_grad([p], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))
    assert clip_grad([p], 0.0) == pytest.approx(1.0)  # measure only


def test_gradient_accumulation_equals_full_batch(make_model):
    ids = torch.randint(0, 96, (5, 8), generator=torch.Generator().manual_seed(0))

    def loss_fn(model, batch):
        logits = model(batch)[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 96), batch[:, 1:].reshape(-1))

    full = make_model().train()
    loss_fn(full, ids).backward()
    acc = make_model().train()
    parts = list(micro_batches(5, 2))
    assert parts == [slice(0, 2), slice(2, 4), slice(4, 5)]
    for part in parts:
        (loss_fn(acc, ids[part]) * accumulation_weight(part, 5)).backward()
    for a, b in zip(full.parameters(), acc.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_check_finite_raises_clear_error():
    check_finite("loss", 1.5, step=3)
    check_finite("loss", torch.tensor([1.0, 2.0]), step=3)
    with pytest.raises(NonFiniteError, match="loss is nan at step 7"):
        check_finite("loss", torch.tensor(float("nan")), step=7)
    with pytest.raises(NonFiniteError, match="grad_norm is inf at step 2"):
        check_finite("grad_norm", math.inf, step=2)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    assert resolve_dtype_name("auto", "cpu") == "fp32"
    assert resolve_dtype_name("bf16", "cpu") == "bf16"
    with autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
