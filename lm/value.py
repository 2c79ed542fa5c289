"""A value head on a transformer trunk: the critic of PPO with a learned baseline.

Where from: PPO for language models (Ouyang et al. 2022; Stiennon et al. 2020) trains a critic that
shares the policy's architecture and starts from its weights, with a scalar head on the final
hidden state; V(s_t) is read at the state before token t. Here the trunk is a full copy of the
starting policy (no weight sharing, so the value loss never moves the policy), the head a
zero-initialised linear map (every value starts at 0: the first advantages are the rewards).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lm.model import Transformer


class ValueModel(nn.Module):
    """V(s_t) for every position of a sequence: a `Transformer` trunk and a linear head."""

    def __init__(self, trunk: Transformer) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(trunk.config.dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: Tensor, *, positions: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        """Values [B, T] (float32) of the states after each token of `tokens` [B, T]."""
        hidden = self.trunk(tokens, positions=positions, key_mask=key_mask, return_hidden=True)  # [B, T, D]
        return self.head(hidden).squeeze(-1).float()  # [B, T]
