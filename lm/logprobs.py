"""Per-token log-probabilities of given tokens, the quantity every trainer needs.

GRPO (Shao et al. 2024, eq. 3) needs log pi_theta(o_t | q, o_<t) for each completion token under
the policy, the old policy and the reference model; SFT and distillation need the same for their
targets. This module computes them from one forward pass, projecting onto the vocabulary only the
rows whose next token is a completion token, a chunk of rows at a time: a 49k-vocabulary model then
never holds a [B, T, V] logits tensor. With autograd on, each chunk is recomputed in the backward
pass (activation checkpointing) so its [rows, V] logits are not kept either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lm.model import Transformer

__all__ = ["token_logprobs", "padding_layout"]

# Logits elements per chunk (rows x vocab): 4M floats = 16 MB in fp32.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def token_logprobs(model: Transformer, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                   *, temperature: float = 1.0, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """log p(input_ids[b, t] | input_ids[b, <t]) for every completion token.

    Args:
        model: the policy (or reference) `Transformer`.
        input_ids: [B, T] prompt + completion ids; padding on the left, the right, or both.
        attention_mask: [B, T] 1/True for real tokens. Padding must be contiguous at either end
            (no holes inside a row); left padding gets rotary positions that start at 0 on the
            first real token, so a left-padded row scores exactly like the unpadded sequence.
        completion_mask: [B, T] 1/True on the tokens to score (typically the completion's tokens).
            Position 0 has no context and is never scored.
        temperature: logits are divided by it before log_softmax (1.0 = the model's distribution,
            what `TorchSampler` reports; pass the sampling temperature to match TRL's convention).
        chunk_elements: rows x vocab projected at once.

    Returns:
        [B, T] float32 log-probs, 0.0 wherever completion_mask is false (and at t = 0).
    """
    B, T = input_ids.shape
    attn = attention_mask.bool()  # [B, T]
    positions, key_mask = padding_layout(attn)  # [B, T] | None each
    hidden = model(input_ids, positions=positions, key_mask=key_mask, return_hidden=True)  # [B, T, D]
    score = completion_mask.bool().clone()  # [B, T]
    score[:, 0] = False
    rows = hidden[:, :-1][score[:, 1:]]  # [N, D] states that predict a scored token
    targets = input_ids[:, 1:][score[:, 1:]]  # [N]
    weight = model.output_weight  # [V, D]
    chunk = max(1, chunk_elements // weight.shape[0])
    pieces = []
    for i in range(0, rows.shape[0], chunk):
        h, y = rows[i:i + chunk], targets[i:i + chunk]  # [n, D], [n]
        if torch.is_grad_enabled() and rows.shape[0] > chunk:
            pieces.append(checkpoint(_chunk_logprobs, h, y, weight, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, y, weight, temperature))  # [n]
    values = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)  # [N]
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)  # [B, T]
    return out.masked_scatter(score, values.float())  # [B, T]


def _chunk_logprobs(h: Tensor, targets: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """log_softmax(h W^T / temperature)[target] for n rows: h [n, D], targets [n] -> [n]."""
    logits = F.linear(h, weight).float()  # [n, V]
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # [n]
    return picked - torch.logsumexp(logits, dim=-1)  # [n]


def padding_layout(attention_mask: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Rotary positions and key mask for `Transformer.forward` from a [B, T] bool mask.

    Right padding needs neither (pads come after every real token, so causal attention never sees
    them): returns (None, None) and the model takes SDPA's is_causal path. Left padding returns
    positions counting from each row's first real token and the mask itself.
    """
    if bool(attention_mask[:, 0].all()):
        return None, None
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp_(min=0)  # [B, T]
    return positions, attention_mask
