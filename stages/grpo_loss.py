"""GRPO's loss pieces as small functions on tensors: advantages, clipped surrogate, k3 KL, aggregation.

Where from:
- Group-relative advantages and the KL-penalised clipped objective: DeepSeekMath (Shao et al. 2024,
  eq. 3 and §4.1.2), used unchanged by DeepSeek-R1 (2025, eq. 1-3).
- Clip-higher (separate ε_low / ε_high) and token-mean aggregation: DAPO (Yu et al. 2025, eq. 8-10).
- No std scaling and a constant normaliser instead of per-sequence length: Dr. GRPO
  ("Understanding R1-Zero-Like Training", Liu et al. 2025, eq. 3).
- Batch-std scaling: the "group mean, batch std" mix of Liu et al. 2025 ("Part I: Tricks or Traps",
  Lite PPO) / TRL's `scale_rewards="batch"`.
- The k3 KL estimator: Schulman, "Approximating KL Divergence" (2020), as in DeepSeekMath eq. 4.

Each variant is its own function, registered by name (`ADVANTAGES`, `AGGREGATIONS`); a stage's
config picks a name. Metrics are returned detached beside the loss and are additive across the
micro-batches of one batch (each is normalised by whole-batch counts, see `LossScale`), so a
training loop sums them over gradient-accumulation steps to get the batch figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Advantages


@dataclass(frozen=True)
class Advantages:
    """Per-completion advantages and which groups carried no signal.

    Attributes:
        values: [P, G] advantage of completion g of prompt p (0 for a zero-spread group).
        zero_spread: [P] bool, True where all G rewards of a group are equal: such a group has
            zero advantage everywhere, so it contributes no policy gradient (only KL).
    """

    values: Tensor
    zero_spread: Tensor


def _center(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """(r − group mean) and the zero-spread flags [P].

    Equality is tested as max == min rather than std == 0 so that a group like [0.1, 0.1, 0.1]
    (whose floating-point mean is not exactly 0.1) is still flagged.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, G] with G >= 2, got shape {tuple(rewards.shape)}")
    zero = rewards.amax(dim=1) == rewards.amin(dim=1)  # [P]
    return rewards - rewards.mean(dim=1, keepdim=True), zero  # [P, G], [P]


def _flagged(values: Tensor, zero: Tensor) -> Advantages:
    """Exact zeros for zero-spread groups (not rounding noise amplified by 1/(std + ε), nor the
    0/0 of ε = 0)."""
    return Advantages(values.masked_fill(zero.unsqueeze(1), 0.0), zero)  # [P, G], [P]


def group_std_advantages(rewards: Tensor, eps: float = 1e-4) -> Advantages:
    """GRPO (DeepSeekMath eq. 3 / §4.1.2): A = (r − mean_group) / (std_group + ε).

    std is the unbiased sample std over the G completions (as TRL and OpenRLHF compute it).

    Args:
        rewards: [P, G] scalar reward of each completion, grouped by prompt.
        eps: added to the std so a near-constant group does not explode.
    Returns:
        Advantages with values [P, G] and zero_spread [P].
    """
    centered, zero = _center(rewards)  # [P, G], [P]
    std = rewards.std(dim=1, keepdim=True)  # [P, 1]
    return _flagged(centered / (std + eps), zero)


def no_std_advantages(rewards: Tensor, eps: float = 1e-4) -> Advantages:
    """Dr. GRPO (Liu et al. 2025 eq. 3): A = r − mean_group, no std division.

    Dividing by the group std up-weights groups that are almost all right or all wrong (a
    question-difficulty bias); Dr. GRPO drops it. `eps` is accepted for a uniform signature only.
    """
    del eps
    centered, zero = _center(rewards)  # [P, G], [P]
    return _flagged(centered, zero)


def batch_std_advantages(rewards: Tensor, eps: float = 1e-4) -> Advantages:
    """Group-mean centring, batch-std scaling: A = (r − mean_group) / (std_batch + ε).

    The std is the unbiased sample std over all P·G rewards, so every group shares one scale and
    low-spread groups are not amplified (Lite PPO / TRL `scale_rewards="batch"`).
    """
    centered, zero = _center(rewards)  # [P, G], [P]
    std = rewards.flatten().std() if rewards.numel() > 1 else rewards.new_zeros(())  # []
    return _flagged(centered / (std + eps), zero)


AdvantageFn = Callable[[Tensor, float], Advantages]
ADVANTAGES: dict[str, AdvantageFn] = {
    "group": group_std_advantages,
    "none": no_std_advantages,
    "batch": batch_std_advantages,
}


# --------------------------------------------------------------------------------------------------
# Per-token pieces


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float,
                      eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO clipped surrogate loss with clip-higher (DAPO eq. 8; DeepSeekMath eq. 3).

        loss_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A),   ρ_t = exp(logp_t − old_logp_t)

    Args:
        logp: [B, T] log-probs of the sampled tokens under the policy being trained (with grad).
        old_logp: [B, T] log-probs under the policy that sampled them (no grad needed).
        advantages: [B] one advantage per completion, shared by its tokens.
        eps_low, eps_high: clip range below and above 1 (ε_high > ε_low is DAPO's clip-higher).
    Returns:
        (loss [B, T], clipped_low [B, T] bool, clipped_high [B, T] bool). A token is clipped low
        when ρ < 1 − ε_low with A < 0 and high when ρ > 1 + ε_high with A > 0: exactly the
        tokens whose gradient the clip switched off.
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages.unsqueeze(1)  # [B, 1]
    unclipped = ratio * adv  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # [B, T]
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    r = ratio.detach()  # [B, T]
    low = (r < 1.0 - eps_low) & (adv < 0)  # [B, T]
    high = (r > 1.0 + eps_high) & (adv > 0)  # [B, T]
    return loss, low, high


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) (DeepSeekMath eq. 4; Schulman 2020).

        kl_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1   (≥ 0, unbiased under samples of π_θ)

    Args:
        logp: [B, T] policy log-probs of the sampled tokens (with grad).
        ref_logp: [B, T] reference-model log-probs of the same tokens.
    Returns:
        [B, T] per-token KL estimate.
    """
    d = ref_logp - logp  # [B, T]
    return torch.exp(d) - d - 1.0  # [B, T]


def mask_truncated(completion_mask: Tensor, truncated: Tensor) -> Tensor:
    """DAPO's overlong filtering (§3.4): drop every token of a completion cut off by the length
    budget, so a truncated answer is neither rewarded nor punished.

    Args:
        completion_mask: [B, T] 1 on real completion tokens, 0 on padding.
        truncated: [B] bool, True where the sampler stopped on the token budget ("length").
    Returns:
        [B, T] the mask with truncated rows zeroed.
    """
    return completion_mask * (~truncated).unsqueeze(1).to(completion_mask.dtype)  # [B, T]


# --------------------------------------------------------------------------------------------------
# Aggregation


@dataclass(frozen=True)
class LossScale:
    """Whole-batch counts that every aggregation divides by.

    Computed once from the whole batch's mask and handed to each micro-batch, so summing the
    micro-batch losses (gradient accumulation) gives exactly the whole-batch loss.

    Attributes:
        num_rows: every completion in the batch, masked or not.
        num_sequences: completions with at least one unmasked token.
        num_tokens: unmasked tokens in the batch.
        max_tokens: Dr. GRPO's constant per-completion normaliser (the generation budget).
    """

    num_rows: int
    num_sequences: int
    num_tokens: int
    max_tokens: int

    @classmethod
    def of(cls, mask: Tensor, max_tokens: int) -> "LossScale":
        """Counts of a [B, T] mask (the whole batch), with `max_tokens` the generation budget."""
        lengths = mask.sum(dim=1)  # [B]
        return cls(num_rows=int(mask.shape[0]), num_sequences=int((lengths > 0).sum()),
                   num_tokens=int(lengths.sum()), max_tokens=int(max_tokens))


def sequence_mean(values: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Original GRPO (DeepSeekMath eq. 3): mean over each completion's tokens, then mean over the
    completions. Fully masked completions count in neither mean.

    Args:
        values: [b, T] per-token values of a micro-batch; mask: [b, T] 0/1.
        scale: counts of the whole batch (`num_sequences` is the outer denominator).
    Returns:
        scalar, this micro-batch's share of the batch loss.
    """
    per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [b]
    return per_seq.sum() / max(scale.num_sequences, 1)  # []


def token_mean(values: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """DAPO (eq. 10): one mean over every unmasked token of the batch, so long completions weigh
    in proportion to their length instead of being diluted."""
    return (values * mask).sum() / max(scale.num_tokens, 1)  # []


def constant_normalizer(values: Tensor, mask: Tensor, scale: LossScale) -> Tensor:
    """Dr. GRPO (eq. 3): sum of each completion's tokens over a constant (the generation budget),
    then mean over all completions; no length bias from 1/|o_i|."""
    return (values * mask).sum() / max(scale.num_rows * scale.max_tokens, 1)  # []


Aggregation = Callable[[Tensor, Tensor, LossScale], Tensor]
AGGREGATIONS: dict[str, Aggregation] = {
    "sequence_mean": sequence_mean,
    "token_mean": token_mean,
    "constant": constant_normalizer,
}


# --------------------------------------------------------------------------------------------------
# The objective


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, scale: LossScale,
              aggregate: Aggregation = sequence_mean, eps_low: float = 0.2, eps_high: float = 0.2,
              ref_logp: Tensor | None = None, beta: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective on one micro-batch (DeepSeek-R1 eq. 1, negated for minimisation):

        loss = aggregate(clipped_surrogate + β · k3_kl)

    Args:
        logp: [b, T] policy log-probs (with grad); old_logp: [b, T] sampling-policy log-probs.
        advantages: [b] per completion; mask: [b, T] 0/1 completion tokens that count.
        scale: whole-batch counts (`LossScale.of(full_mask, max_new_tokens)`).
        aggregate: one of `AGGREGATIONS`.
        eps_low, eps_high: clip range; ref_logp: [b, T] reference log-probs, needed iff beta > 0.
    Returns:
        (loss, metrics). Metrics are detached scalars, additive over the micro-batches of a batch:
        `policy_loss` and `kl_loss` (aggregated, loss = policy_loss + kl_loss), and the token
        means `kl`, `clip_low`, `clip_high` (fractions of tokens whose gradient the clip cut).
    """
    mask = mask.to(logp.dtype)
    pg, low, high = clipped_surrogate(logp, old_logp.detach(), advantages.detach(), eps_low, eps_high)
    policy_loss = aggregate(pg, mask, scale)  # []
    n_tok = max(scale.num_tokens, 1)
    metrics = {
        "policy_loss": policy_loss.detach(),
        "clip_low": (low.to(mask.dtype) * mask).sum().detach() / n_tok,
        "clip_high": (high.to(mask.dtype) * mask).sum().detach() / n_tok,
    }
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp.detach())  # [b, T]
        kl_loss = beta * aggregate(kl, mask, scale)  # []
        metrics["kl"] = (kl.detach() * mask).sum() / n_tok
        metrics["kl_loss"] = kl_loss.detach()
        return policy_loss + kl_loss, metrics
    return policy_loss, metrics
