"""Preference-optimisation losses as small functions on tensors: DPO (sigmoid) and IPO.

Where from:
- DPO: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7:
      L = −log σ(β [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))])
- IPO: Azar et al. 2024, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17: L = (h − 1/(2β))², h the same log-ratio difference; a squared loss that
  stops pushing once the margin reaches 1/(2β) (DPO's sigmoid keeps pushing toward infinity on
  deterministic preferences).

Each loss takes the per-pair log-ratios h_w = log π_θ(y_w) − log π_ref(y_w) and h_l (sequence log-probs:
sums over the completion's tokens, as in both papers; TRL averages over tokens for IPO, we do not)
and returns the per-pair loss; `dpo_loss` sums them over a micro-batch and divides by the number of
pairs of the whole batch (an argument, so gradient accumulation and a distributed run can pass the
global count). Losses are registered by name (`DPO_LOSSES`); the stage's config accepts its keys.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor


def sigmoid_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023 eq. 7): −log σ(β (h_w − h_l)).

    Args:
        chosen_logratio, rejected_logratio: [B] log π_θ(y) − log π_ref(y) of each pair's completions.
        beta: the KL-regularisation strength β (> 0).
    Returns:
        [B] per-pair loss.
    """
    return -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))  # [B]


def ipo_loss(chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2024 eq. 17): (h_w − h_l − 1/(2β))², regressing the margin onto 1/(2β).

    Args and returns as `sigmoid_loss`; here β is the paper's τ.
    """
    return (chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta)) ** 2  # [B]


PreferenceLoss = Callable[[Tensor, Tensor, float], Tensor]
DPO_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
}


def sequence_logps(token_logp: Tensor, mask: Tensor) -> Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over the completion's tokens.

    Args:
        token_logp: [B, T] per-token log-probs; mask: [B, T] 1 on the completion's tokens.
    Returns:
        [B] sequence log-probs.
    """
    return (token_logp * mask.to(token_logp.dtype)).sum(dim=1)  # [B]


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float, num_pairs: int, loss: PreferenceLoss = sigmoid_loss) -> tuple[Tensor, dict[str, Tensor]]:
    """A preference loss on one micro-batch of pairs.

    Args:
        policy_chosen, policy_rejected: [b] sequence log-probs under the policy (with grad).
        ref_chosen, ref_rejected: [b] the same under the frozen reference.
        beta: β; num_pairs: pairs in the whole batch (the normaliser; ≥ 1).
        loss: one of `DPO_LOSSES`.
    Returns:
        (loss, metrics): loss = Σ per-pair loss / num_pairs. Metrics are detached and additive over
        the micro-batches of a batch: `loss`, `margin` (mean h_w − h_l, the chosen-minus-rejected
        log-ratio margin), `reward_chosen` / `reward_rejected` (mean β·h, DPO's implicit rewards)
        and `accuracy` (share of pairs with h_w > h_l).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h_w = policy_chosen - ref_chosen.detach()  # [b]
    h_l = policy_rejected - ref_rejected.detach()  # [b]
    n = max(int(num_pairs), 1)
    total = loss(h_w, h_l, beta).sum() / n  # []
    d_w, d_l = h_w.detach(), h_l.detach()
    metrics = {
        "loss": total.detach(),
        "margin": (d_w - d_l).sum() / n,
        "reward_chosen": beta * d_w.sum() / n,
        "reward_rejected": beta * d_l.sum() / n,
        "accuracy": (d_w > d_l).to(d_w.dtype).sum() / n,
    }
    return total, metrics
