"""Per-token log-probabilities of given tokens, the quantity every trainer needs.

GRPO (Shao et al. 2024, eq. 3) needs log pi_theta(o_t | q, o_<t) for each completion token under
the policy, the old policy and the reference model; SFT and distillation need the same for their
targets. This module computes them from one forward pass, projecting onto the vocabulary only the
rows whose next token is a completion token, a chunk of rows at a time: a 49k-vocabulary model then
never holds a [B, T, V] logits tensor. With autograd on, each chunk is recomputed in the backward
pass (activation checkpointing) so its [rows, V] logits are not kept either.

`completion_logprobs` is the same quantity for G completions that share a prompt (GRPO's groups):
each prompt runs once and its completions attend to its keys/values through `SharedPrefixKV`, an
`lm.model.Cache` that prepends the prompt's keys/values instead of storing anything in place.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lm.model import Transformer

__all__ = ["token_logprobs", "sequence_hidden", "shared_prefix_length", "packing", "padding_layout", "completion_logprobs",
           "PrefixBatch", "PromptKV", "SharedPrefixKV"]

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
            Position 0 and each row's first real token have no context and are never scored.
        temperature: logits are divided by it before log_softmax (1.0 = the model's distribution,
            what `TorchSampler` reports; pass the sampling temperature to match TRL's convention).
        chunk_elements: rows x vocab projected at once.

    Returns:
        [B, T] float32 log-probs, 0.0 wherever completion_mask is false (and at t = 0).
    """
    B, T = input_ids.shape
    hidden = sequence_hidden(model, input_ids, attention_mask)  # [B, T, D]
    score = completion_mask.bool().clone()  # [B, T]
    score[:, 0] = False
    score[:, 1:] &= attention_mask[:, :-1].bool()  # a row's first real token has no context either
    rows = hidden[:, :-1][score[:, 1:]]  # [N, D] states that predict a scored token
    targets = input_ids[:, 1:][score[:, 1:]]  # [N]
    values = target_logprobs(model, rows, targets, temperature=temperature, chunk_elements=chunk_elements)  # [N]
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)  # [B, T]
    return out.masked_scatter(score, values)  # [B, T]


def target_logprobs(model: Transformer, rows: Tensor, targets: Tensor, *, temperature: float = 1.0,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """log_softmax(rows Wᵀ / temperature)[target] for N hidden states, projected onto the
    vocabulary a chunk of rows at a time (checkpointed under autograd, so no [n, V] logits are
    kept for the backward pass).

    Args:
        rows: [N, D] final normed hidden states, each predicting one target.
        targets: [N] token ids.

    Returns:
        [N] float32 log-probs.
    """
    weight = model.output_weight  # [V, D]
    chunk = max(1, chunk_elements // weight.shape[0])
    pieces = []
    for i in range(0, rows.shape[0], chunk):
        h, y = rows[i:i + chunk], targets[i:i + chunk]  # [n, D], [n]
        if torch.is_grad_enabled() and rows.shape[0] > chunk:
            pieces.append(checkpoint(_chunk_logprobs, h, y, weight, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, y, weight, temperature))  # [n]
    if not pieces:
        return rows.new_zeros(0, dtype=torch.float32)  # [0]
    return torch.cat(pieces).float()  # [N]


def _chunk_logprobs(h: Tensor, targets: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """log_softmax(h W^T / temperature)[target] for n rows: h [n, D], targets [n] -> [n]."""
    logits = F.linear(h, weight).float()  # [n, V]
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # [n]
    return picked - torch.logsumexp(logits, dim=-1)  # [n]


# A right-padded batch whose rows open with the same tokens runs them once when that saves at least
# this share of its positions (a chat template's system turn and examples before short answers).
SHARED_PREFIX_MIN_SAVING = 0.25
# A batch whose padding is at least this share of its positions runs its real tokens only
# (`Transformer.forward(packed=...)`): GRPO's completions are padded to the longest of 64.
PACK_MIN_PADDING = 0.1


def packing(real: Tensor) -> Tensor | None:
    """`real` ([B, T] bool) as `Transformer.forward`'s `packed` argument when padding is at least
    `PACK_MIN_PADDING` of the positions, else None (the padded batch is cheaper to run as it is)."""
    return real if float(real.sum()) <= (1 - PACK_MIN_PADDING) * real.numel() else None


def shared_prefix_length(input_ids: Tensor, attention_mask: Tensor) -> int:
    """How many leading tokens every row of a right-padded batch has in common (real in every row,
    and at most the shortest row's length - 1, so each row keeps a token of its own)."""
    lengths = attention_mask.sum(dim=1)  # [B]
    limit = int(lengths.min()) - 1
    if limit <= 0:
        return 0
    differs = (input_ids[:, :limit] != input_ids[:1, :limit]).any(dim=0)  # [limit]
    return int(differs.int().argmax()) if bool(differs.any()) else limit


def sequence_hidden(model: Transformer, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The final normed hidden states [B, T, D] of a batch (padding on either end, as in
    `token_logprobs`).

    A right-padded batch whose rows share their first Lp tokens (an SFT or distillation batch under a
    chat template with a system prompt) runs that prefix once and every row's rest against its
    keys/values (`SharedPrefixKV`), when that skips at least `SHARED_PREFIX_MIN_SAVING` of the
    positions: the same states to fp32 rounding (tested, with gradients), B·T - (B-1)·Lp positions
    through the model instead of B·T.
    """
    B, T = input_ids.shape
    attn = attention_mask.bool()  # [B, T]
    positions, key_mask = padding_layout(attn)  # [B, T] | None each
    Lp = shared_prefix_length(input_ids, attn) if positions is None and B > 1 else 0
    if (B - 1) * Lp < SHARED_PREFIX_MIN_SAVING * B * T:
        return model(input_ids, positions=positions, key_mask=key_mask, return_hidden=True,
                     packed=packing(attn))  # [B, T, D]
    prompt_kv = PromptKV()
    hp = model(input_ids[:1, :Lp], cache=prompt_kv, return_hidden=True)  # [1, Lp, D]
    group = torch.zeros(B, dtype=torch.long, device=input_ids.device)  # [B] every row reads prefix 0
    hs = model(input_ids[:, Lp:], cache=SharedPrefixKV(prompt_kv, group), return_hidden=True,
               packed=packing(attn[:, Lp:]))  # [B, T-Lp, D]
    return torch.cat([hp.expand(B, -1, -1), hs], dim=1)  # [B, T, D]


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


# --------------------------------------------------------------------------------------------------
# Completions that share a prompt


class PrefixBatch(Protocol):
    """G completions per prompt, each prompt stored once (GRPO's `TrainBatch` fits)."""

    prompt_ids: Tensor  # [P, Lp] left-padded
    prompt_mask: Tensor  # [P, Lp] bool, real prompt tokens
    completion_ids: Tensor  # [N, Lc] right-padded
    completion_real: Tensor  # [N, Lc] bool, generated tokens (what attention may see)
    group: Tensor  # [N] long, prompt row of each completion


class PromptKV:
    """An `lm.model.Cache` that keeps each layer's prompt keys/values as they are (no in-place
    writes, so autograd can flow through them)."""

    def __init__(self) -> None:
        self.pos = 0
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[layer], self.v[layer] = k, v  # [P, Hkv, Lp, hd] each
        return k, v

    def advance(self, n: int) -> None:
        self.pos += n


class SharedPrefixKV:
    """An `lm.model.Cache` that prepends each completion row's prompt keys/values (gathered by
    `group`) to the completion's own, so completions attend to a prompt computed once."""

    def __init__(self, prompt: PromptKV, group: Tensor) -> None:
        self.pos, self.prompt, self.group = prompt.pos, prompt, group

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        pk = self.prompt.k[layer].index_select(0, self.group)  # [N, Hkv, Lp, hd]
        pv = self.prompt.v[layer].index_select(0, self.group)  # [N, Hkv, Lp, hd]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # [N, Hkv, Lp+Lc, hd] each

    def advance(self, n: int) -> None:
        self.pos += n


def completion_logprobs(model: Transformer, b: PrefixBatch, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """log π(o_t | q, o_<t) of every completion token, each group's prompt computed once.

    Equal (to fp32 rounding; tested) to `token_logprobs` over the concatenated sequences, with
    P·Lp + N·Lc tokens through the model instead of N·(Lp + Lc): 22% less forward/backward work at
    the GRPO benchmark's shape (prompts ~22 tokens, 64 new). The prompt pass records keys/values
    per layer in `PromptKV`; the completion pass runs through the same `Transformer.forward` with
    `SharedPrefixKV` as its cache, rotary positions continuing after each row's prompt and a key
    mask hiding prompt and completion padding.

    Returns:
        [N, Lc] float32 log-probs, 0 on padding.
    """
    N, Lc = b.completion_ids.shape
    p_pos = (b.prompt_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # [P, Lp]
    prompt_kv = PromptKV()
    hp = model(b.prompt_ids, positions=p_pos, key_mask=b.prompt_mask, cache=prompt_kv,
               return_hidden=True)  # [P, Lp, D]
    c_pos = b.prompt_mask.sum(dim=1)[b.group].unsqueeze(1) + torch.arange(Lc, device=b.group.device)  # [N, Lc]
    c_pos = c_pos.clamp(max=model.config.max_seq_len - 1)  # only padding can pass the end
    key_mask = torch.cat([b.prompt_mask[b.group], b.completion_real], dim=1)  # [N, Lp+Lc]
    hc = model(b.completion_ids, positions=c_pos, key_mask=key_mask, cache=SharedPrefixKV(prompt_kv, b.group),
               return_hidden=True, packed=packing(b.completion_real))  # [N, Lc, D]
    # token t is predicted by the state before it: the prompt's last state for t = 0
    pred = torch.cat([hp[:, -1][b.group].unsqueeze(1), hc[:, :-1]], dim=1)  # [N, Lc, D]
    rows, targets = pred[b.completion_real], b.completion_ids[b.completion_real]  # [n, D], [n]
    values = target_logprobs(model, rows, targets, chunk_elements=chunk_elements)  # [n]
    out = torch.zeros(N, Lc, dtype=torch.float32, device=b.completion_ids.device)  # [N, Lc]
    return out.masked_scatter(b.completion_real, values)  # [N, Lc]
