"""GRPO loss pieces against values worked out by hand (each comment shows the arithmetic)."""
from __future__ import annotations

import math

import pytest
import torch

from stages.grpo_loss import (
    ADVANTAGES, AGGREGATIONS, LossScale, batch_std_advantages, clipped_surrogate, constant_normalizer,
    group_std_advantages, grpo_loss, k3_kl, mask_truncated, no_std_advantages, sequence_mean, token_mean,
)


def close(a: torch.Tensor, b, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------- advantages


def test_group_std_advantages_hand_worked() -> None:
    # group 0: rewards 1,0,0,0 -> mean 0.25; deviations .75,-.25,-.25,-.25; sum of squares
    #   .5625 + 3*.0625 = .75; unbiased var .75/3 = .25 -> std .5; A = 1.5, -.5, -.5, -.5
    # group 1: all 1 -> zero spread: flagged, A = 0
    adv = group_std_advantages(torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]]), eps=0.0)
    close(adv.values, [[1.5, -0.5, -0.5, -0.5], [0, 0, 0, 0]])
    assert adv.zero_spread.tolist() == [False, True]


def test_group_std_advantages_eps() -> None:
    # rewards 1,0: mean .5, unbiased std sqrt(.5) = .70711; with eps .1: .5 / .80711 = .61949
    adv = group_std_advantages(torch.tensor([[1.0, 0.0]]), eps=0.1)
    close(adv.values, [[0.5 / (math.sqrt(0.5) + 0.1), -0.5 / (math.sqrt(0.5) + 0.1)]], tol=1e-6)


def test_zero_spread_group_is_exactly_zero_even_for_inexact_floats() -> None:
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004 in floating point, so mean - 0.1 != 0; flagged groups
    # must still be exactly 0, not ±1e-17 / eps amplified into noise.
    for fn in ADVANTAGES.values():
        adv = fn(torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3]], dtype=torch.float64), 1e-4)
        assert adv.zero_spread.tolist() == [True, True]
        assert torch.equal(adv.values, torch.zeros(2, 3, dtype=torch.float64))


def test_no_std_advantages_hand_worked() -> None:
    # Dr. GRPO: just r - mean. group 0: 1,0,0,0 - .25 = .75,-.25,-.25,-.25; group 1: 2,0 style
    # scale is kept (rewards 3,1 -> mean 2 -> 1,-1 with no division)
    close(no_std_advantages(torch.tensor([[1.0, 0, 0, 0]])).values, [[0.75, -0.25, -0.25, -0.25]])
    close(no_std_advantages(torch.tensor([[3.0, 1.0]])).values, [[1.0, -1.0]])


def test_batch_std_advantages_hand_worked() -> None:
    # group means .5 and 1 -> centred [.5,-.5], [0,0]; batch 1,0,1,1: mean .75, deviations
    # .25,-.75,.25,.25, squares .0625+.5625+.0625+.0625 = .75, unbiased var .25 -> std .5
    # A = [.5/.5, -.5/.5] = [1, -1], [0, 0] (group 1 flagged)
    adv = batch_std_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), eps=0.0)
    close(adv.values, [[1.0, -1.0], [0.0, 0.0]])
    assert adv.zero_spread.tolist() == [False, True]
    # contrast with per-group std: group 0 alone has std sqrt(.5) -> A = ±.70711
    close(group_std_advantages(torch.tensor([[1.0, 0.0]]), eps=0.0).values,
          [[0.5 / math.sqrt(0.5), -0.5 / math.sqrt(0.5)]])


def test_advantages_reject_bad_shapes() -> None:
    with pytest.raises(ValueError):
        group_std_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError):
        group_std_advantages(torch.tensor([[1.0], [0.0]]))  # G = 1: no group to compare with


# ------------------------------------------------------------------------------------ surrogate


def _ratios(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp with grad, old_logp) whose ratio exp(logp - old) is `values` (old = log .5)."""
    old = torch.full((len(values), 1), math.log(0.5))
    logp = (old + torch.log(torch.tensor(values)).unsqueeze(1)).requires_grad_(True)
    return logp, old


def test_clipped_surrogate_both_sides_hand_worked() -> None:
    # eps_low .2, eps_high .28 -> clip range [0.8, 1.28]
    #   ρ=1.5, A=+1: min(1.5, 1.28) = 1.28 -> loss -1.28, clipped high, no gradient
    #   ρ=1.5, A=-1: min(-1.5, -1.28) = -1.5 -> loss 1.5, not clipped (pessimistic side)
    #   ρ=0.5, A=-1: min(-.5, -.8) = -.8 -> loss .8, clipped low, no gradient
    #   ρ=0.5, A=+1: min(.5, .8) = .5 -> loss -.5, not clipped
    #   ρ=1.1, A=+2: inside the range -> loss -2.2
    #   ρ=1.25, A=+1: inside with clip-higher (would be clipped at symmetric 1.2) -> loss -1.25
    logp, old = _ratios([1.5, 1.5, 0.5, 0.5, 1.1, 1.25])
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 2.0, 1.0])
    loss, low, high = clipped_surrogate(logp, old, adv, eps_low=0.2, eps_high=0.28)
    close(loss.squeeze(1), [-1.28, 1.5, 0.8, -0.5, -2.2, -1.25], tol=1e-5)
    assert low.squeeze(1).tolist() == [False, False, True, False, False, False]
    assert high.squeeze(1).tolist() == [True, False, False, False, False, False]
    # d loss / d logp = -A ρ where unclipped, 0 where clipped:
    #   0, -(-1)(1.5) = 1.5, 0, -(1)(.5) = -.5, -(2)(1.1) = -2.2, -1.25
    loss.sum().backward()
    close(logp.grad.squeeze(1), [0.0, 1.5, 0.0, -0.5, -2.2, -1.25], tol=1e-5)


def test_clipped_surrogate_symmetric_clip_cuts_1_25() -> None:
    # eps_high .2: ρ = 1.25 > 1.2 with A = +1 -> loss -1.2, clipped high
    logp, old = _ratios([1.25])
    loss, low, high = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    close(loss, [[-1.2]], tol=1e-5)
    assert high.item() and not low.item()


def test_ratio_one_gives_the_plain_policy_gradient() -> None:
    # μ = 1: old = logp.detach() -> ρ = 1, loss = -A, gradient -A (REINFORCE with a baseline)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([0.5, -2.0])
    loss, low, high = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.28)
    close(loss, [[-0.5, -0.5], [2.0, 2.0]])
    loss.sum().backward()
    close(logp.grad, [[-0.5, -0.5], [2.0, 2.0]])
    assert not low.any() and not high.any()


# ------------------------------------------------------------------------------------------ KL


def test_k3_kl_hand_worked() -> None:
    # p = .5, ref = .25: d = ref - logp = log .5 = -.693147; exp(d) = .5
    #   kl = .5 + .693147 - 1 = .193147; equal log-probs -> exp(0) - 0 - 1 = 0
    # p = .25, ref = .5: d = log 2 = .693147 -> 2 - .693147 - 1 = .306853
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.3, 0.5]]))
    close(k3_kl(logp, ref), [[0.5 + math.log(2) - 1, 0.0, 2 - math.log(2) - 1]], tol=1e-6)
    assert (k3_kl(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_k3_kl_gradient() -> None:
    # d kl / d logp = -exp(d) + 1 with d = ref - logp: at p = .5, ref = .25 -> 1 - .5 = .5
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    k3_kl(logp, torch.log(torch.tensor([[0.25]]))).sum().backward()
    close(logp.grad, [[0.5]], tol=1e-6)


# --------------------------------------------------------------------------------------- masking


def test_mask_truncated() -> None:
    # row 1 hit the length budget: all its tokens go; the padding of row 0 stays 0
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    out = mask_truncated(mask, torch.tensor([False, True]))
    close(out, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------------- aggregation

VALUES = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])  # 9s sit under the mask
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_scale_counts() -> None:
    assert LossScale.of(MASK, max_tokens=4) == LossScale(num_rows=2, num_sequences=2, num_tokens=4, max_tokens=4)


def test_sequence_mean_hand_worked() -> None:
    # per-sequence means (1+2+3)/3 = 2 and 4/1 = 4, then (2 + 4) / 2 = 3
    close(sequence_mean(VALUES, MASK, LossScale.of(MASK, 4)), 3.0)


def test_token_mean_hand_worked() -> None:
    # (1 + 2 + 3 + 4) / 4 tokens = 2.5
    close(token_mean(VALUES, MASK, LossScale.of(MASK, 4)), 2.5)


def test_constant_normalizer_hand_worked() -> None:
    # (1 + 2 + 3 + 4) / (2 completions * budget 4) = 10 / 8 = 1.25; budget 10 -> 10 / 20 = .5
    close(constant_normalizer(VALUES, MASK, LossScale.of(MASK, 4)), 1.25)
    close(constant_normalizer(VALUES, MASK, LossScale.of(MASK, 10)), 0.5)


def test_aggregations_with_a_masked_completion() -> None:
    # row 1 truncated and masked out: sequence mean 6/3 = 2 over 1 sequence; token mean 6/3 = 2;
    # constant 6 / (2 rows * 4) = .75 (the normaliser is a constant: masked rows still count)
    mask = mask_truncated(MASK, torch.tensor([False, True]))
    scale = LossScale.of(mask, 4)
    assert (scale.num_sequences, scale.num_tokens) == (1, 3)
    close(sequence_mean(VALUES, mask, scale), 2.0)
    close(token_mean(VALUES, mask, scale), 2.0)
    close(constant_normalizer(VALUES, mask, scale), 0.75)


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_micro_batches_add_up_to_the_batch(name: str) -> None:
    # gradient accumulation: rows split in two micro-batches sharing the batch's scale sum to the
    # whole-batch value
    agg = AGGREGATIONS[name]
    values, mask = torch.rand(6, 5), (torch.rand(6, 5) > 0.3).float()
    mask[2] = 0.0
    scale = LossScale.of(mask, 5)
    whole = agg(values, mask, scale)
    parts = agg(values[:4], mask[:4], scale) + agg(values[4:], mask[4:], scale)
    close(parts, whole.item(), tol=1e-6)


# ------------------------------------------------------------------------------------- objective


def test_grpo_loss_hand_worked_with_kl() -> None:
    # two one-token completions, ρ = 1, A = +1 and -1: surrogate -1 and +1 -> sequence mean 0
    # KL: row 0 p=.5, ref=.25 -> .193147; row 1 p=ref -> 0; sequence mean .0965736
    # loss = 0 + β(.1) * .0965736 = .00965736; token-mean kl metric = .0965736
    logp = torch.log(torch.tensor([[0.5], [0.3]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25], [0.3]]))
    mask = torch.ones(2, 1)
    kl0 = 0.5 + math.log(2) - 1
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, scale=LossScale.of(mask, 1),
                        ref_logp=ref, beta=0.1)
    close(loss, 0.1 * kl0 / 2, tol=1e-6)
    close(m["policy_loss"], 0.0)
    close(m["kl"], kl0 / 2, tol=1e-6)
    close(m["kl_loss"], 0.1 * kl0 / 2, tol=1e-6)
    assert all(not v.requires_grad for v in m.values())
    # gradient: policy part -A / 2 per row = -.5, +.5; KL part β (1 - ref/p) / 2 = .1 * .5 / 2 = .025
    loss.backward()
    close(logp.grad, [[-0.5 + 0.025], [0.5]], tol=1e-6)


def test_zero_advantage_group_gives_no_policy_gradient() -> None:
    # a zero-spread group has A = 0: surrogate 0 everywhere, so with β = 0 the gradient is 0 and
    # only the KL term moves the policy when β > 0
    adv = group_std_advantages(torch.tensor([[1.0, 1.0]])).values.flatten()  # [0, 0]
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    mask = torch.ones(2, 2)
    loss, m = grpo_loss(logp, logp.detach() + 0.3, adv, mask, scale=LossScale.of(mask, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 2))
    assert m["clip_low"].item() == 0.0 and m["clip_high"].item() == 0.0


def test_grpo_loss_clip_fractions_and_mask() -> None:
    # tokens: ρ = 1.5 (A=+1, clipped high), ρ = .5 (A=-1 row, clipped low), one masked token
    # that would be clipped but does not count: clip_high = 1/3, clip_low = 1/3 over 3 tokens
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.5]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _, m = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), mask, scale=LossScale.of(mask, 2),
                     eps_low=0.2, eps_high=0.2)
    close(m["clip_high"], 1 / 3)
    close(m["clip_low"], 1 / 3)
    # policy loss, sequence mean: row 0 (-1.2 + -1) / 2 = -1.1; row 1: -min(-.5, -.8) = .8
    # -> (-1.1 + .8) / 2 = -.15
    close(m["policy_loss"], -0.15, tol=1e-5)


def test_grpo_loss_needs_ref_when_beta_positive() -> None:
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, torch.zeros(1), torch.ones(1, 1), scale=LossScale.of(torch.ones(1, 1), 1), beta=0.1)
