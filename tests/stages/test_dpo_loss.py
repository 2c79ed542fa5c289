"""DPO / IPO losses against values worked out by hand (each comment shows the arithmetic)."""
from __future__ import annotations

import math

import pytest
import torch

from stages.dpo_loss import DPO_LOSSES, dpo_loss, ipo_loss, sequence_logps, sigmoid_loss


def close(a: torch.Tensor, b, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


def test_sigmoid_loss_hand_worked() -> None:
    # β = .5, h_w = 1, h_l = -1: β(h_w - h_l) = 1 -> -log σ(1) = log(1 + e^-1) = .313262
    # equal log-ratios: -log σ(0) = log 2 = .693147
    # d/dh_w = -β σ(-1) = -.5 · .268941 = -.134471; d/dh_l = +.134471
    h_w = torch.tensor([1.0, 0.3], requires_grad=True)
    h_l = torch.tensor([-1.0, 0.3], requires_grad=True)
    loss = sigmoid_loss(h_w, h_l, 0.5)
    close(loss, [math.log(1 + math.exp(-1)), math.log(2)], tol=1e-6)
    loss.sum().backward()
    s = 1 / (1 + math.exp(1))  # σ(-1)
    close(h_w.grad, [-0.5 * s, -0.25], tol=1e-6)
    close(h_l.grad, [0.5 * s, 0.25], tol=1e-6)


def test_ipo_loss_hand_worked() -> None:
    # β = .5 -> target margin 1/(2β) = 1; margins 2, 0, 1 -> (2-1)² = 1, (0-1)² = 1, 0
    # d/dh_w = 2 (margin - 1) = 2, -2, 0: IPO pulls back a margin beyond its target
    h_w = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)
    h_l = torch.tensor([-1.0, 0.0, -0.5])
    loss = ipo_loss(h_w, h_l, 0.5)
    close(loss, [1.0, 1.0, 0.0])
    loss.sum().backward()
    close(h_w.grad, [2.0, -2.0, 0.0])


def test_sequence_logps_sums_completion_tokens() -> None:
    # row 0: -1 + -2 (the -9 is masked); row 1: -.5
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(sequence_logps(lp, mask), [-3.0, -0.5])


def test_dpo_loss_hand_worked() -> None:
    # h_w = policy - ref: [-2 - -3, -3 - -3] = [1, 0]; h_l: [-5 - -4, -2 - -2] = [-1, 0]; β = .5
    # per pair: -log σ(.5 · 2) = .313262 and -log σ(0) = .693147; / 2 pairs -> .503204
    # margin (2 + 0)/2 = 1; rewards β h: chosen (.5 + 0)/2 = .25, rejected (-.5 + 0)/2 = -.25
    # accuracy: pair 0 has h_w > h_l, pair 1 ties -> 1/2
    pc = torch.tensor([-2.0, -3.0], requires_grad=True)
    pr = torch.tensor([-5.0, -2.0], requires_grad=True)
    loss, m = dpo_loss(pc, pr, torch.tensor([-3.0, -3.0]), torch.tensor([-4.0, -2.0]), beta=0.5, num_pairs=2)
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    close(loss, expected, tol=1e-6)
    close(m["loss"], expected, tol=1e-6)
    close(m["margin"], 1.0)
    close(m["reward_chosen"], 0.25)
    close(m["reward_rejected"], -0.25)
    close(m["accuracy"], 0.5)
    assert all(not v.requires_grad for v in m.values())
    # gradient flows to the policy only: d/d pc0 = -β σ(-1) / 2 = -.067235
    loss.backward()
    close(pc.grad, [-0.5 / (1 + math.e) / 2, -0.5 * 0.5 / 2], tol=1e-6)


def test_micro_batches_add_up_to_the_batch() -> None:
    # the normaliser is the whole batch's pair count: two halves sum to the whole
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(6, generator=g) for _ in range(4)]
    for name, fn in DPO_LOSSES.items():
        whole, mw = dpo_loss(*x, beta=0.1, num_pairs=6, loss=fn)
        a, ma = dpo_loss(*(t[:4] for t in x), beta=0.1, num_pairs=6, loss=fn)
        b, mb = dpo_loss(*(t[4:] for t in x), beta=0.1, num_pairs=6, loss=fn)
        close(a + b, whole.item(), tol=1e-6)
        for k in mw:
            close(ma[k] + mb[k], mw[k].item(), tol=1e-6)


def test_dpo_loss_rejects_nonpositive_beta() -> None:
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0, num_pairs=1)
