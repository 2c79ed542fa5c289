"""On-policy distillation's loss as a small function on tensors: per-token reverse KL to the teacher
on the student's own samples.

Where from: GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models", eq. 2 with the
student's own samples, λ = 1, and the reverse KL of §3) and Thinking Machines' "On-Policy
Distillation" (Lu et al. 2025): the student samples a completion, the teacher scores each sampled
token, and the per-token reverse KL estimate

    k_t = log π_s(o_t | q, o_<t) − log π_t(o_t | q, o_<t)

is a negative per-token reward with no discounting. The loss Σ_t sg(k_t) · log π_s(o_t) / N has the
gradient E_{o_t ~ π_s}[k_t ∇log π_s(o_t)] = ∇ KL(π_s ‖ π_t) at each position (the score-function
identity; E[∇log π_s] = 0), so the student moves toward the teacher where *it* goes, without
the teacher's vocabulary-wide distribution. This needs the teacher to read the student's token ids
as the same strings: one tokenizer.
"""
from __future__ import annotations

from torch import Tensor


def reverse_kl_loss(student_logp: Tensor, teacher_logp: Tensor, mask: Tensor, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token reverse-KL policy-gradient loss on one micro-batch of the student's samples.

    Args:
        student_logp: [B, T] log π_s of the sampled tokens (with grad).
        teacher_logp: [B, T] log π_t of the same tokens (no grad needed).
        mask: [B, T] 1 on the sampled completion tokens.
        num_tokens: completion tokens in the whole batch (the normaliser; a distributed run passes
            the global count).
    Returns:
        (loss, metrics): loss = Σ sg(k_t) log π_s(o_t) / num_tokens; metrics (detached, additive
        over micro-batches): `loss` and `reverse_kl` (Σ k_t / num_tokens, the sample estimate of
        the per-token KL(π_s ‖ π_t)).
    """
    m = mask.to(student_logp.dtype)  # [B, T]
    n = max(int(num_tokens), 1)
    k = (student_logp.detach() - teacher_logp.detach()) * m  # [B, T]
    loss = (k * student_logp).sum() / n  # []
    return loss, {"loss": loss.detach(), "reverse_kl": k.sum() / n}
