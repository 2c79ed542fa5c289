"""Shared training components: schedule, optimizer groups, clipping, finite guard, device and precision."""
from __future__ import annotations

import math

import pytest
import torch

from lm.train import (NonFiniteError, autocast_context, check_finite, clip_grad, fast_fp32_matmul, lr_at, make_optimizer,
                      resolve_device, resolve_dtype_name, set_lr, training_precision)


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


def test_fast_fp32_matmul_is_fp32_exact_and_restores_the_setting() -> None:
    mm = getattr(torch.backends.mkldnn, "matmul", None)
    if mm is None or not hasattr(mm, "fp32_precision"):
        pytest.skip("this torch has no oneDNN matmul precision switch (the context is a no-op)")
    before = mm.fp32_precision
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 256, dtype=torch.float64, generator=g), torch.randn(64, 256, dtype=torch.float64, generator=g)
    ref = x @ w.T
    with fast_fp32_matmul("cpu", "fp32"):
        y = torch.nn.functional.linear(x.float(), w.float()).double()
        # 1 + 2^-10 is not a bf16 number: a bf16 downcast would return 256, fp32 returns 256.25
        exact = torch.nn.functional.linear(torch.full((4, 256), 1 + 2**-10), torch.ones(8, 256))
    assert mm.fp32_precision == before
    assert float((y - ref).abs().max()) < 1e-3  # fp32 level (bf16 would be ~0.1)
    assert exact[0, 0].item() == 256.25


def test_training_precision() -> None:
    assert training_precision("cpu", "fp32", autocast=False) == "fp32"
    want = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert training_precision("cpu", "fp32", autocast=True) == want
    assert training_precision("cpu", "bf16", autocast=False) == want


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_only_where_the_device_does_bf16_natively(monkeypatch, native):
    import lm.train

    monkeypatch.setattr(lm.train, "native_bf16", lambda device: native)
    with autocast_context("cpu", "bf16"):
        # emulated bf16 (an AVX2-only CPU) is slower and less exact than fp32: autocast stays off
        assert torch.is_autocast_enabled("cpu") is native
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    with autocast_context("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    assert lm.train.training_precision("cpu", "fp32", autocast=True) == ("bf16" if native else "fp32")
