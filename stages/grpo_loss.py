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
- Leave-one-out baseline: RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 9); REINFORCE++-baseline
  (Hu et al. 2025, "REINFORCE++", §3.2: group mean subtracted, then normalised over the batch).
- Sequence-level ratio and clipping: GSPO (Zheng et al. 2025, eq. 5-7, the GSPO-token form eq. 13).
- Clipped, stop-gradient importance weight on every token's log-prob: CISPO (MiniMax-M1, 2025, eq. 4-5).
- PPO with a learned critic: generalized advantage estimation (Schulman et al. 2016, "GAE", eq. 16)
  and the clipped value loss of PPO2 (as in OpenAI baselines / TRL's PPO trainer).
- Truncated importance sampling between the sampler's and the trainer's log-probs: Yao et al. 2025
  ("Your Efficient RL Framework Secretly Brings You Off-Policy RL Training", eq. 2; verl `tis_imp_ratio_cap`).

Each variant is its own function, registered by name (`ADVANTAGES`, `POLICY_LOSSES`,
`AGGREGATIONS`); a stage's config picks a name and accepts exactly the registry's keys. Metrics are returned detached beside the loss and are additive across the
micro-batches of one batch (each is normalised by whole-batch counts, see `LossScale`), so a
training loop sums them over gradient-accumulation steps to get the batch figure.
"""
from __future__ import annotations

import math
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


def rloo_advantages(rewards: Tensor, eps: float = 1e-4) -> Advantages:
    """RLOO (Ahmadian et al. 2024 eq. 9; Kool et al. 2019): each completion's baseline is the mean
    of the *other* G − 1 rewards of its group,

        A_i = r_i − 1/(G−1) Σ_{j≠i} r_j = G/(G−1) · (r_i − mean_group),

    an unbiased baseline (it does not depend on r_i). The advantages of a group sum to zero. No
    std scaling (as verl's `compute_rloo_outcome_advantage`); `eps` is accepted for a uniform
    signature only.
    """
    del eps
    centered, zero = _center(rewards)  # [P, G], [P]
    G = rewards.shape[1]
    return _flagged(centered * (G / (G - 1)), zero)  # [P, G]


def reinforce_pp_advantages(rewards: Tensor, eps: float = 1e-4) -> Advantages:
    """REINFORCE++-baseline (Hu et al. 2025, §3.2): subtract the group mean, then normalise the
    centred values over the whole batch, A = (c − mean_batch(c)) / (std_batch(c) + ε) with
    c = r − mean_group.

    Departure: verl whitens over tokens (each completion weighted by its length); the batch here
    is the P·G completions, each counted once. std is the unbiased sample std over the batch's
    completions, zero-spread groups included (they hold c = 0 and are then set to exactly 0).
    """
    centered, zero = _center(rewards)  # [P, G], [P]
    flat = centered.flatten()  # [P*G]
    std = flat.std() if flat.numel() > 1 else flat.new_zeros(())  # []
    return _flagged((centered - flat.mean()) / (std + eps), zero)  # [P, G]


AdvantageFn = Callable[[Tensor, float], Advantages]
ADVANTAGES: dict[str, AdvantageFn] = {
    "group": group_std_advantages,
    "none": no_std_advantages,
    "batch": batch_std_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}


# --------------------------------------------------------------------------------------------------
# PPO with a critic: per-token advantages


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """An outcome reward as a per-token reward: all of it on each completion's last real token.

    Args:
        rewards: [B] one scalar per completion; mask: [B, T] 1 on the completion's real tokens
            (contiguous from t = 0).
    Returns:
        [B, T] zeros except r_B at t = |o| − 1 (a completion with no token gets none).
    """
    lengths = mask.sum(dim=1).long()  # [B]
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)  # [B, T]
    rows = torch.nonzero(lengths > 0).squeeze(1)  # [b]
    out[rows, lengths[rows] - 1] = rewards[rows]
    return out


def gae_advantages(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16):

        δ_t = r_t + γ V_{t+1} − V_t,    A_t = Σ_l (γλ)^l δ_{t+l},    returns R_t = A_t + V_t

    with V = 0 after a completion's last token (the episode ends there). λ = 1 gives Monte-Carlo
    returns minus the value baseline; λ = 0 one-step TD.

    Args:
        token_rewards: [B, T] per-token rewards (`outcome_token_rewards`); values: [B, T] critic
            values V(s_t) of the state before token t (old critic, no grad); mask: [B, T] 0/1.
        gamma, lam: discount γ and GAE λ, in [0, 1].
    Returns:
        (advantages [B, T], returns [B, T]), 0 on padding.
    """
    m = mask.to(values.dtype)  # [B, T]
    v = values.detach() * m  # [B, T]
    T = v.shape[1]
    adv = torch.zeros_like(v)  # [B, T]
    running = v.new_zeros(v.shape[0])  # [B]
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else v.new_zeros(v.shape[0])  # [B]
        next_m = m[:, t + 1] if t + 1 < T else v.new_zeros(v.shape[0])  # [B]
        delta = token_rewards[:, t] + gamma * next_v - v[:, t]  # [B]
        running = delta + gamma * lam * next_m * running  # [B]
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + v) * m  # [B, T], [B, T]


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the unmasked entries (PPO's advantage normalisation), 0 on padding."""
    m = mask.to(values.dtype)  # [B, T]
    n = m.sum().clamp(min=1)
    mean = (values * m).sum() / n  # []
    var = (((values - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)  # [] unbiased
    return (values - mean) / (var.sqrt() + eps) * m  # [B, T]


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float,
                       scale: LossScale, aggregate: "Aggregation") -> tuple[Tensor, dict[str, Tensor]]:
    """PPO2's clipped value loss: 0.5 · max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²), so a
    value moving further than ε_v from the old one gets no gradient when that makes it worse.

    Args:
        values: [b, T] critic values (with grad); old_values: [b, T] those the advantages used;
        returns: [b, T] GAE returns; mask: [b, T] 0/1; clip: ε_v > 0; scale, aggregate: as grpo_loss.
    Returns:
        (loss, metrics): metrics `value_loss` and `value_clip_frac` (tokens where the clipped
        branch was taken), additive over micro-batches.
    """
    m = mask.to(values.dtype)  # [b, T]
    old = old_values.detach()
    clipped = old + torch.clamp(values - old, -clip, clip)  # [b, T]
    plain_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2  # [b, T] each
    loss = aggregate(0.5 * torch.maximum(plain_sq, clipped_sq), m, scale)  # []
    n_tok = max(scale.num_tokens, 1)
    frac = ((clipped_sq > plain_sq).to(m.dtype) * m).sum() / n_tok
    return loss, {"value_loss": loss.detach(), "value_clip_frac": frac.detach()}


# --------------------------------------------------------------------------------------------------
# Per-token pieces


def _per_token(advantages: Tensor) -> Tensor:
    """[B] per-completion advantages as [B, 1] (shared by the tokens); [B, T] per-token ones (GAE) as is."""
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float,
                      eps_high: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token PPO clipped surrogate loss with clip-higher (DAPO eq. 8; DeepSeekMath eq. 3).
    The `clip` policy loss.

        loss_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A),   ρ_t = exp(logp_t − old_logp_t)

    Args:
        logp: [B, T] log-probs of the sampled tokens under the policy being trained (with grad).
        old_logp: [B, T] log-probs under the policy that sampled them (no grad needed).
        advantages: [B] one advantage per completion, shared by its tokens, or [B, T] per token (GAE).
        eps_low, eps_high: clip range below and above 1 (ε_high > ε_low is DAPO's clip-higher).
        mask: [B, T] unused (every token is its own unit); accepted for the `POLICY_LOSSES` signature.
    Returns:
        (loss [B, T], clipped_low [B, T] bool, clipped_high [B, T] bool). A token is clipped low
        when ρ < 1 − ε_low with A < 0 and high when ρ > 1 + ε_high with A > 0: exactly the
        tokens whose gradient the clip switched off.
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = _per_token(advantages)  # [B, 1] or [B, T]
    unclipped = ratio * adv  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # [B, T]
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    r = ratio.detach()  # [B, T]
    low = (r < 1.0 - eps_low) & (adv < 0)  # [B, T]
    high = (r > 1.0 + eps_high) & (adv > 0)  # [B, T]
    return loss, low, high


def gspo_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float,
                   mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GSPO (Zheng et al. 2025, eq. 5-7): one importance ratio per completion, the geometric mean
    of its token ratios, clipped as a whole:

        s_i = (π_θ(o_i|q) / π_old(o_i|q))^(1/|o_i|) = exp(mean_t (logp_t − old_logp_t))
        loss_i = −min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i)

    Written per token in the GSPO-token form (eq. 13, as verl's `gspo` loss): s_{i,t} =
    sg(s_i) · π_θ(o_t)/sg(π_θ(o_t)) has the value s_i on every token and the gradient
    s_i ∇log π_θ(o_t), so with one advantage per completion every aggregation gives GSPO's
    gradient. With a single token per completion, s_i = ρ_i and this is exactly `clipped_surrogate`.

    The paper clips far tighter than token-level PPO (ε_low = 3e-4, ε_high = 4e-4, §5.1): a
    sequence ratio is a mean of log-ratios, so it moves much less than single tokens' ratios.

    Args:
        logp, old_logp: [B, T] as in `clipped_surrogate`; advantages: [B].
        mask: [B, T] 0/1 tokens of each completion (needed: |o_i| and the mean run over them).
    Returns:
        (loss [B, T], clipped_low [B, T], clipped_high [B, T]): every token of a completion carries
        its sequence's loss value and its sequence's clip flags.
    """
    if mask is None:
        raise ValueError("gspo needs the completion mask (the sequence ratio averages over real tokens)")
    m = mask.to(logp.dtype)  # [B, T]
    log_s = ((logp - old_logp).detach() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)  # [B]
    # value log s_i on every token, gradient of log π_θ(o_t); capped at 10 against exp overflow (verl)
    log_ratio = torch.clamp(logp - logp.detach() + log_s.unsqueeze(1), max=10.0)  # [B, T]
    return clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), advantages, eps_low, eps_high)


def cispo_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float,
                    mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """CISPO (MiniMax-M1 2025, eq. 4-5): REINFORCE with a clipped, stop-gradient importance weight,

        loss_t = −sg(clip(ρ_t, 1 − ε_low, 1 + ε_high)) · A · log π_θ(o_t)

    No token is dropped: where the PPO clip would zero a token's gradient, CISPO keeps it with the
    weight capped. Inside the trust region the gradient −ρ_t A ∇log π_θ equals the clip loss's
    (∇ρ_t = ρ_t ∇log π_θ). The paper sets no lower bound (ε_low large) and tunes ε_high only; the
    loss *value* is not a surrogate of the return (it carries log π), only its gradient is.

    Args:
        as `clipped_surrogate` (mask unused).
    Returns:
        (loss [B, T], capped_low [B, T], capped_high [B, T]): the tokens whose weight was capped
        below 1 − ε_low or above 1 + ε_high, whatever the advantage's sign (their gradient is kept,
        only scaled).
    """
    del mask
    ratio = torch.exp(logp - old_logp).detach()  # [B, T]
    weight = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # [B, T]
    loss = -weight * _per_token(advantages) * logp  # [B, T]
    return loss, ratio < 1.0 - eps_low, ratio > 1.0 + eps_high


PolicyLossFn = Callable[[Tensor, Tensor, Tensor, float, float, Tensor], tuple[Tensor, Tensor, Tensor]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "clip": clipped_surrogate,
    "gspo": gspo_surrogate,
    "cispo": cispo_surrogate,
}
"""(logp, old_logp, advantages, eps_low, eps_high, mask) -> (per-token loss, clipped_low, clipped_high)."""


def tis_weights(trainer_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (Yao et al. 2025, eq. 2): the sampler's log-probs differ
    from the trainer's for the same weights (bf16, another inference engine, fused kernels), so
    the samples come from π_sampler, not π_old; each token's loss is reweighted by

        w_t = min(π_old_train(o_t) / π_sampler(o_t), C)

    truncated at C to bound the variance. Detached: a correction factor, not a gradient path.

    Args:
        trainer_logp: [B, T] old-policy log-probs as the trainer computes them.
        sampler_logp: [B, T] the same tokens' log-probs as the sampler reported them.
        cap: C > 0.
    Returns:
        [B, T] weights in (0, C].
    """
    if cap <= 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    return torch.exp(trainer_logp.detach() - sampler_logp.detach()).clamp(max=cap)  # [B, T]


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
              ref_logp: Tensor | None = None, beta: float = 0.0, policy_loss: PolicyLossFn = clipped_surrogate,
              sampler_logp: Tensor | None = None, tis_cap: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective on one micro-batch (DeepSeek-R1 eq. 1, negated for minimisation):

        loss = aggregate(w_tis · policy_loss + β · k3_kl)

    Args:
        logp: [b, T] policy log-probs (with grad); old_logp: [b, T] old-policy log-probs as the
            trainer computes them.
        advantages: [b] per completion; mask: [b, T] 0/1 completion tokens that count.
        scale: whole-batch counts (`LossScale.of(full_mask, max_new_tokens)`); a distributed run
            passes the counts of the global batch.
        aggregate: one of `AGGREGATIONS`; policy_loss: one of `POLICY_LOSSES` (default `clip`).
        eps_low, eps_high: clip range; ref_logp: [b, T] reference log-probs, needed iff beta > 0.
        sampler_logp, tis_cap: with a cap, each token's policy loss is weighted by
            `tis_weights(old_logp, sampler_logp, tis_cap)` (truncated importance sampling).
    Returns:
        (loss, metrics). Metrics are detached scalars, additive over the micro-batches of a batch:
        `policy_loss` and `kl_loss` (aggregated, loss = policy_loss + kl_loss), and the token
        means `kl`, `clip_low`, `clip_high` (fractions of tokens the variant clipped; see its
        docstring), `clip_frac` (their sum), and with TIS `tis_weight` (mean weight) and
        `tis_capped` (fraction of tokens whose weight the cap truncated).
    """
    mask = mask.to(logp.dtype)
    pg, low, high = policy_loss(logp, old_logp.detach(), advantages.detach(), eps_low, eps_high, mask)
    n_tok = max(scale.num_tokens, 1)
    metrics: dict[str, Tensor] = {}
    if tis_cap is not None:
        if sampler_logp is None:
            raise ValueError("tis_cap needs sampler_logp")
        w = tis_weights(old_logp, sampler_logp, tis_cap).to(pg.dtype)  # [b, T]
        pg = pg * w  # [b, T]
        capped = (old_logp.detach() - sampler_logp.detach()) >= math.log(tis_cap)  # [b, T]
        metrics["tis_weight"] = (w * mask).sum() / n_tok
        metrics["tis_capped"] = (capped.to(mask.dtype) * mask).sum() / n_tok
    policy = aggregate(pg, mask, scale)  # []
    clip_low = (low.to(mask.dtype) * mask).sum().detach() / n_tok
    clip_high = (high.to(mask.dtype) * mask).sum().detach() / n_tok
    metrics |= {"policy_loss": policy.detach(), "clip_low": clip_low, "clip_high": clip_high,
                "clip_frac": clip_low + clip_high}
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp.detach())  # [b, T]
        kl_loss = beta * aggregate(kl, mask, scale)  # []
        metrics["kl"] = (kl.detach() * mask).sum() / n_tok
        metrics["kl_loss"] = kl_loss.detach()
        return policy + kl_loss, metrics
    return policy, metrics
