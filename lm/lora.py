"""LoRA and DoRA adapters on chosen linear layers of a Transformer.

LoRA (Hu et al. 2021, eq. 3): h = W0 x + (alpha / r) B A x, with A [r, in] ~ Kaiming-uniform,
B [out, r] = 0, so training starts from the base model; only A and B train.
DoRA (Liu et al. 2024, eq. 5): W' = m * (W0 + s B A) / ||W0 + s B A||_c, with a trainable
magnitude m [out] initialised to the row norms of W0 (torch's [out, in] layout: the norm of each
output unit's weight vector, the paper's column norm). As in the paper (section 4.3) the norm is
detached in the backward pass, which saves memory and barely changes the gradient.

`LoRALinear` subclasses `nn.Linear`, so the frozen base weight keeps its Meta name
(`layers.0.attention.wq.weight`) and the adapters sit beside it (`...wq.lora_A`, `...wq.lora_B`,
`...wq.lora_magnitude`). `merge` folds the adapter into the weight for fast inference and keeps the
original weight to restore it exactly on `unmerge`. `merged_weight()` lets `save_checkpoint` write
a plain model without merging in place; `save_adapters` writes the adapter tensors alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import Tensor, nn

from lm.checkpoint import CheckpointError, read_safetensors
from lm.model import Transformer

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_parameters",
           "lora_state_dict", "save_adapters", "load_adapters"]

ADAPTERS, ADAPTER_CONFIG = "adapters.safetensors", "adapter_config.json"


@dataclass
class LoraConfig:
    """Which layers get adapters and how big they are.

    targets: names of linear layers inside each block ("wq", "wk", "wv", "wo", "w1", "w2", "w3");
    a layer is wrapped when its module path ends with ".<target>".
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    dora: bool = False
    layers: tuple[int, ...] | None = field(default=None)  # None = every block

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank (optionally weight-decomposed) trainable update."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # the same Parameter objects: no copy, names unchanged
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scaling, self.dora = cfg.r, cfg.scaling, cfg.dora
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, device=self.weight.device,
                                               dtype=self.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, device=self.weight.device,
                                               dtype=self.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_magnitude = nn.Parameter(self.weight.detach().norm(dim=1)) if cfg.dora else None  # [out]
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self._unmerged_weight: Tensor | None = None

    def delta_weight(self) -> Tensor:
        """s B A: the LoRA update of the weight [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling  # [out, in]

    def merged_weight(self) -> Tensor:
        """The weight this layer effectively applies (what `merge` writes into `weight`)."""
        if self.merged:
            return self.weight.detach()
        with torch.no_grad():
            w = self.weight + self.delta_weight()  # [out, in]
            if self.dora:
                w = w * (self.lora_magnitude / w.norm(dim=1)).unsqueeze(1)  # [out, in]
        return w

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)  # [..., out]
        base = F.linear(x, self.weight)  # [..., out]
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling  # [..., out]
        if self.dora:
            norm = (self.weight + self.delta_weight()).norm(dim=1).detach()  # [out]
            out = (base + update) * (self.lora_magnitude / norm)  # [..., out]
        else:
            out = base + update  # [..., out]
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(self.merged_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        assert self._unmerged_weight is not None
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False


def apply_lora(model: Transformer, cfg: LoraConfig) -> list[str]:
    """Wrap the target linear layers in place and freeze everything but the adapters.

    Returns the module paths wrapped (e.g. "layers.0.attention.wq").
    """
    wrapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not _is_target(name, cfg):
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, cfg))
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no linear layer matches targets {cfg.targets} (layers {cfg.layers})")
    for pname, p in model.named_parameters():
        p.requires_grad_(_is_adapter_param(pname))
    return wrapped


def _is_target(name: str, cfg: LoraConfig) -> bool:
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "layers" or parts[-1] not in cfg.targets:
        return False
    return cfg.layers is None or int(parts[1]) in cfg.layers


def _is_adapter_param(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_magnitude")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if _is_adapter_param(n)]


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, by their full names."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if _is_adapter_param(n)}


def save_adapters(directory: str | Path, model: Transformer, cfg: LoraConfig) -> Path:
    """Write `adapters.safetensors` (adapter tensors only) and `adapter_config.json`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(m.merged for m in lora_modules(model).values()):
        raise ValueError("unmerge the adapters before saving them alone")
    (d / ADAPTERS).write_bytes(st_save({k: v.cpu() for k, v in lora_state_dict(model).items()}))
    (d / ADAPTER_CONFIG).write_text(json.dumps({"format": "r1flow-lora-v1", "lora": asdict(cfg)}, indent=1))
    return d


def load_adapters(directory: str | Path, model: Transformer) -> LoraConfig:
    """Wrap `model` as the saved adapters were and load their tensors (the base weights stay)."""
    d = Path(directory)
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"no adapters at {d}: {ADAPTER_CONFIG} is missing")
    raw = json.loads(cfg_path.read_text())
    if raw.get("format") != "r1flow-lora-v1":
        raise CheckpointError(f"{cfg_path}: unknown adapter format {raw.get('format')!r}")
    lc = raw["lora"]
    cfg = LoraConfig(**{**lc, "targets": tuple(lc["targets"]),
                        "layers": None if lc["layers"] is None else tuple(lc["layers"])})
    tensors = read_safetensors(d / ADAPTERS)
    if not lora_modules(model):
        apply_lora(model, cfg)
    own = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:5], sorted(set(tensors) - expected)[:5]
        raise CheckpointError(f"{d}: adapter tensors do not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, t in tensors.items():
            p = own[name]
            if p.shape != t.shape:
                raise CheckpointError(f"{d}: adapter {name!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
    return cfg
