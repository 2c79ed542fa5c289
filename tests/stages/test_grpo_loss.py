"""GRPO loss pieces against values worked out by hand (each comment shows the arithmetic)."""
from __future__ import annotations

import math

import pytest
import torch

from stages.grpo_loss import (
    ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, LossScale, batch_std_advantages, cispo_surrogate, clipped_surrogate,
    clipped_value_loss, constant_normalizer, gae_advantages, group_std_advantages, grpo_loss, gspo_surrogate, k3_kl,
    mask_truncated, no_std_advantages, outcome_token_rewards, reinforce_pp_advantages, rloo_advantages, sequence_mean,
    tis_weights, token_mean, whiten,
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


def test_rloo_advantages_hand_worked() -> None:
    # leave-one-out: rewards 1,0,0,0 -> A_0 = 1 - (0+0+0)/3 = 1, A_1..3 = 0 - (1+0+0)/3 = -1/3
    #   (= 4/3 · (r - .25): 4/3 · .75 = 1, 4/3 · -.25 = -1/3)
    # rewards 3,1,2 -> 3 - (1+2)/2 = 1.5, 1 - (3+2)/2 = -1.5, 2 - (3+1)/2 = 0
    close(rloo_advantages(torch.tensor([[1.0, 0, 0, 0]])).values, [[1.0, -1 / 3, -1 / 3, -1 / 3]])
    close(rloo_advantages(torch.tensor([[3.0, 1.0, 2.0]])).values, [[1.5, -1.5, 0.0]])


def test_rloo_advantages_sum_to_zero_per_group() -> None:
    # Σ_i (r_i - mean of the others) = G/(G-1) · Σ_i (r_i - mean) = 0, whatever the rewards
    rewards = torch.rand(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rewards[3] = 0.5  # a zero-spread group too
    adv = rloo_advantages(rewards)
    torch.testing.assert_close(adv.values.sum(dim=1), torch.zeros(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert adv.zero_spread.tolist() == [False, False, False, True, False, False, False]


def test_reinforce_pp_advantages_hand_worked() -> None:
    # group-centred: [1,0] -> .5,-.5 and [1,1] -> 0,0 (zero spread); batch of centred values
    #   .5,-.5,0,0: mean 0, squares .25+.25 = .5, unbiased var .5/3 = .16667 -> std .408248
    #   A = ±.5/.408248 = ±1.224745, group 1 exactly 0
    adv = reinforce_pp_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), eps=0.0)
    close(adv.values, [[0.5 / math.sqrt(0.5 / 3), -0.5 / math.sqrt(0.5 / 3)], [0.0, 0.0]], tol=1e-6)
    assert adv.zero_spread.tolist() == [False, True]
    # contrast: batch-std divides by the std of the raw rewards 1,0,1,1 (= .5) -> ±1
    close(batch_std_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), eps=0.0).values, [[1.0, -1.0], [0.0, 0.0]])


def test_reinforce_pp_advantages_are_batch_whitened() -> None:
    # over the completions of non-flat groups: mean 0, unbiased std 1 (eps 0)
    rewards = torch.rand(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = reinforce_pp_advantages(rewards, eps=0.0).values.flatten()
    torch.testing.assert_close(a.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(a.std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12, rtol=0)


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


# ------------------------------------------------------------------------------ policy-loss variants


def test_gspo_hand_worked() -> None:
    # one completion, two real tokens with ratios 1.5 and 1.0 and a padded third (ratio e^5, masked):
    #   log s = (ln 1.5 + 0) / 2 = .202733 -> s = sqrt(1.5) = 1.224745 (the padding does not count)
    #   A = +1, clip range [.8, 1.28]: inside -> every token carries loss -s = -1.224745
    old = torch.full((1, 3), math.log(0.5))
    logp = (old + torch.log(torch.tensor([[1.5, 1.0, math.exp(5.0)]]))).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, low, high = gspo_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28, mask)
    close(loss[:, :2], [[-math.sqrt(1.5), -math.sqrt(1.5)]], tol=1e-6)
    assert not low.any() and not high.any()
    # sequence mean of the per-token loss = -s; d/d logp_t = -A · s / |o| = -1.224745 / 2 = -.612372 on
    # each real token (= d(-s)/d logp_t, since d s / d logp_t = s / |o|), 0 on the padding
    sequence_mean(loss, mask, LossScale.of(mask, 3)).backward()
    close(logp.grad, [[-math.sqrt(1.5) / 2, -math.sqrt(1.5) / 2, 0.0]], tol=1e-6)
    # symmetric ε_high .2: s = 1.2247 > 1.2 -> clipped high on every token, loss -1.2, no gradient
    logp.grad = None
    loss, low, high = gspo_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.2, mask)
    close(loss[:, :2], [[-1.2, -1.2]], tol=1e-6)
    assert high.all() and not low.any()
    sequence_mean(loss, mask, LossScale.of(mask, 3)).backward()
    close(logp.grad, [[0.0, 0.0, 0.0]])


def test_gspo_equals_clip_when_every_completion_has_one_token() -> None:
    # |o_i| = 1: s_i = ρ_i, so loss, clip flags and gradients are those of the token clip
    g = torch.Generator().manual_seed(0)
    old = torch.log(torch.rand(16, 1, generator=g) * 0.9 + 0.05)
    base = old + (torch.rand(16, 1, generator=g) - 0.5)  # ratios in [e^-.5, e^.5]: both sides clip
    adv = torch.randn(16, generator=g)
    mask = torch.ones(16, 1)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    la, lowa, higha = clipped_surrogate(a, old, adv, 0.2, 0.28, mask)
    lb, lowb, highb = gspo_surrogate(b, old, adv, 0.2, 0.28, mask)
    close(lb, la.detach(), tol=1e-6)
    assert torch.equal(lowa, lowb) and torch.equal(higha, highb) and (lowa | higha).any()
    la.sum().backward()
    lb.sum().backward()
    close(b.grad, a.grad, tol=1e-6)


def test_gspo_needs_the_mask() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="mask"):
        gspo_surrogate(x, x, torch.zeros(1), 0.2, 0.2, None)


def test_cispo_hand_worked() -> None:
    # clip range [.8, 1.28]; old p = .5, so p = .5 ρ
    #   ρ=1.5, A=+1: weight 1.28 (capped high), p = .75: loss -1.28 · ln .75 = .368233; grad -1.28
    #      (the clip loss gives this token no gradient; CISPO keeps it, capped)
    #   ρ=0.5, A=-1: weight .8 (capped low), p = .25: loss .8 · ln .25 = -1.109035; grad +.8
    #   ρ=1.1, A=+2: weight 1.1, p = .55: loss -2.2 · ln .55 = 1.315270; grad -2.2 (as the clip loss)
    logp, old = _ratios([1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, low, high = cispo_surrogate(logp, old, adv, 0.2, 0.28)
    close(loss.squeeze(1), [-1.28 * math.log(0.75), 0.8 * math.log(0.25), -2.2 * math.log(0.55)], tol=1e-5)
    assert low.squeeze(1).tolist() == [False, True, False]
    assert high.squeeze(1).tolist() == [True, False, False]
    loss.sum().backward()
    close(logp.grad.squeeze(1), [-1.28, 0.8, -2.2], tol=1e-5)


def test_cispo_gradient_equals_clip_gradient_inside_the_trust_region() -> None:
    # inside [1 - ε_low, 1 + ε_high] the weight is ρ itself: -ρ A ∇log π = -A ∇ρ, the clip loss's
    g = torch.Generator().manual_seed(2)
    old = torch.log(torch.rand(6, 5, generator=g) * 0.9 + 0.05)
    base = old + (torch.rand(6, 5, generator=g) - 0.5) * 0.3  # ρ in [e^-.15, e^.15] ⊂ [.8, 1.28]
    adv = torch.randn(6, generator=g)
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    clipped_surrogate(a, old, adv, 0.2, 0.28)[0].sum().backward()
    loss, low, high = cispo_surrogate(b, old, adv, 0.2, 0.28)
    loss.sum().backward()
    assert not low.any() and not high.any()
    close(b.grad, a.grad, tol=1e-6)


def test_tis_weights_hand_worked() -> None:
    # trainer .5 vs sampler .25 -> 2, capped at 1.5; trainer .3 vs sampler .6 -> .5; equal -> 1
    trainer = torch.log(torch.tensor([[0.5, 0.3, 0.4]]))
    sampler = torch.log(torch.tensor([[0.25, 0.6, 0.4]]))
    close(tis_weights(trainer, sampler, 1.5), [[1.5, 0.5, 1.0]], tol=1e-6)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(trainer, sampler, 0.0)


def test_grpo_loss_with_tis_hand_worked() -> None:
    # two one-token completions on-policy (ρ = 1), A = +1, -1 -> surrogate -1, +1
    # weights: row 0 min(.5/.25, 1.5) = 1.5 (capped), row 1 .3/.6 = .5
    # policy loss, sequence mean: (-1.5 + .5) / 2 = -.5; tis_weight (1.5 + .5)/2 = 1; tis_capped 1/2
    # gradient: -A w / 2 -> -.75, +.25
    logp = torch.log(torch.tensor([[0.5], [0.3]])).requires_grad_(True)
    sampler = torch.log(torch.tensor([[0.25], [0.6]]))
    mask = torch.ones(2, 1)
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, scale=LossScale.of(mask, 1),
                        sampler_logp=sampler, tis_cap=1.5)
    close(loss, -0.5, tol=1e-6)
    close(m["tis_weight"], 1.0, tol=1e-6)
    close(m["tis_capped"], 0.5)
    loss.backward()
    close(logp.grad, [[-0.75], [0.25]], tol=1e-6)
    with pytest.raises(ValueError, match="sampler_logp"):
        grpo_loss(logp, logp.detach(), torch.zeros(2), mask, scale=LossScale.of(mask, 1), tis_cap=2.0)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_every_policy_loss_is_plain_policy_gradient_on_policy(name: str) -> None:
    # ρ = 1 (μ = 1, one mini-batch): every variant's gradient is -A ∇log π per token; the sequence
    # mean divides by 2 tokens and 2 sequences: -A/4 -> -.125 (A = .5) and +.5 (A = -2); no clipping
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    mask = torch.ones(2, 2)
    loss, m = grpo_loss(logp, logp.detach(), torch.tensor([0.5, -2.0]), mask, scale=LossScale.of(mask, 2),
                        policy_loss=POLICY_LOSSES[name])
    loss.backward()
    close(logp.grad, [[-0.125, -0.125], [0.5, 0.5]], tol=1e-6)
    assert m["clip_frac"].item() == 0.0


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


# ------------------------------------------------------------------------------ PPO with a critic


def test_outcome_token_rewards_puts_the_reward_on_the_last_token() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    out = outcome_token_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    close(out, [[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0]])


def test_gae_hand_worked() -> None:
    # V = .5, .6, .7, rewards 0, 0, 1 (outcome on the last token), γ = 1, λ = .5:
    #   δ2 = 1 + 0 - .7 = .3                 A2 = .3
    #   δ1 = 0 + .7 - .6 = .1                A1 = .1 + .5 · .3 = .25
    #   δ0 = 0 + .6 - .5 = .1                A0 = .1 + .5 · .25 = .225
    #   returns A + V = .725, .85, 1.0; the padded 4th token stays 0
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    r = outcome_token_rewards(torch.tensor([1.0]), mask)
    adv, ret = gae_advantages(r, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.225, 0.25, 0.3, 0.0]], tol=1e-6)
    close(ret, [[0.725, 0.85, 1.0, 0.0]], tol=1e-6)
    # λ = 1: Monte-Carlo return (1 everywhere) minus V -> .5, .4, .3; λ = 0: one-step δ -> .1, .1, .3
    close(gae_advantages(r, values, mask, 1.0, 1.0)[0], [[0.5, 0.4, 0.3, 0.0]], tol=1e-6)
    close(gae_advantages(r, values, mask, 1.0, 0.0)[0], [[0.1, 0.1, 0.3, 0.0]], tol=1e-6)
    # γ = .5, λ = 1: discounted return .25, .5, 1 minus V -> -.25, -.1, .3
    close(gae_advantages(r, values, mask, 0.5, 1.0)[0], [[-0.25, -0.1, 0.3, 0.0]], tol=1e-6)


def test_whiten_hand_worked() -> None:
    # unmasked 1, 2, 3: mean 2, unbiased std 1 -> -1, 0, 1; the masked 100 becomes 0
    close(whiten(torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[1, 1], [1, 0]]), eps=0.0),
          [[-1.0, 0.0], [1.0, 0.0]])


def test_clipped_value_loss_hand_worked() -> None:
    # ε_v = .2, token mean over 3 tokens:
    #   V 1.0, old .5, R .6: clipped V .7; (.4)² = .16 vs (.1)² = .01 -> .16 (plain branch), .5 · .16 = .08
    #   V .55, old .5, R 1.0: inside, clipped = V -> (.45)² = .2025 -> .10125
    #   V .9, old .5, R 1.0: clipped .7; (.1)² = .01 vs (.3)² = .09 -> clipped branch .045, no gradient
    # loss (.08 + .10125 + .045) / 3 = .075417; value_clip_frac 1/3
    v = torch.tensor([[1.0, 0.55, 0.9]], requires_grad=True)
    mask = torch.ones(1, 3)
    loss, m = clipped_value_loss(v, torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[0.6, 1.0, 1.0]]), mask,
                                 clip=0.2, scale=LossScale.of(mask, 3), aggregate=token_mean)
    close(loss, (0.08 + 0.10125 + 0.045) / 3, tol=1e-6)
    close(m["value_clip_frac"], 1 / 3)
    # d/dV of .5 (V - R)² / 3 = (V - R) / 3: .4/3, -.45/3, and 0 on the clipped token
    loss.backward()
    close(v.grad, [[0.4 / 3, -0.45 / 3, 0.0]], tol=1e-6)


def test_policy_losses_take_per_token_advantages() -> None:
    # [B, T] advantages (GAE) broadcast like [B] ones: a row of equal per-token advantages gives the
    # same loss as the per-completion advantage
    logp, old = _ratios([1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 2.0])
    mask = torch.ones(3, 1)
    for fn in POLICY_LOSSES.values():
        a, _, _ = fn(logp, old, adv, 0.2, 0.28, mask)
        b, _, _ = fn(logp, old, adv.unsqueeze(1), 0.2, 0.28, mask)
        close(b, a.detach(), tol=1e-6)
