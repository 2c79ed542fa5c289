"""A value head on a transformer trunk: PPO's critic and the outcome reward model (ORM).

Where from: PPO for language models (Ouyang et al. 2022; Stiennon et al. 2020) trains a critic that
shares the policy's architecture and starts from its weights, with a scalar head on the final
hidden state; V(s_t) is read at the state before token t. Here the trunk is a full copy of the
starting policy (no weight sharing, so the value loss never moves the policy), the head a
zero-initialised linear map (every value starts at 0: the first advantages are the rewards).
An outcome reward model (Cobbe et al. 2021's verifier) is the same module read at a sequence's
last token and trained on correctness labels.

On disk (`save_value_model` / `load_value_model`): a directory holding the trunk as an ordinary
checkpoint (`trunk/`, `lm.checkpoint`'s Hugging Face layout: nothing pickled) and the head's two
tensors in `value_head.safetensors`, written atomically as one directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from lm.checkpoint import CheckpointError, atomic_dir, load_checkpoint, read_safetensors, save_checkpoint
from lm.model import Transformer
from lm.tokenizer import Tokenizer

TRUNK, HEAD = "trunk", "value_head.safetensors"


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


def save_value_model(directory: str | Path, model: ValueModel, tokenizer: Tokenizer | None,
                     meta: dict[str, Any] | None = None) -> Path:
    """Write `model` into `directory` atomically (trunk checkpoint with `meta`, head tensors)."""
    target = Path(directory)
    head = {"weight": model.head.weight.detach().float().cpu().contiguous(),  # [1, D]
            "bias": model.head.bias.detach().float().cpu().contiguous()}  # [1]
    with atomic_dir(target) as tmp:
        save_checkpoint(tmp / TRUNK, model.trunk, tokenizer, meta)
        (tmp / HEAD).write_bytes(st_save(head))
    return target


def load_value_model(directory: str | Path, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype = "fp32") -> tuple[ValueModel, Tokenizer | None, dict[str, Any]]:
    """(model in eval mode, tokenizer, meta) of a directory `save_value_model` wrote.

    Raises:
        CheckpointError: a missing or malformed trunk or head (shapes checked against the trunk).
    """
    d = Path(directory)
    trunk, tok, meta = load_checkpoint(d / TRUNK, device=device, dtype=dtype)
    head = read_safetensors(d / HEAD)
    want = {"weight": (1, trunk.config.dim), "bias": (1,)}
    got = {k: tuple(v.shape) for k, v in head.items()}
    if got != want:
        raise CheckpointError(f"{d / HEAD}: expected tensors {want}, found {got}")
    model = ValueModel(trunk)
    model.head.load_state_dict({k: v.float() for k, v in head.items()})
    return model.to(device=device, dtype=next(trunk.parameters()).dtype).eval(), tok, meta
