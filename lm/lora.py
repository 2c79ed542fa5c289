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
a plain model without merging in place; `save_adapters` writes the adapter tensors alone, in
PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, HF module names, q/k rows of
`lora_B` and of the DoRA magnitude in HF's rotate-half layout), which `PeftModel.from_pretrained`
loads over the Hugging Face export of the base model; `load_adapters` reads that format back.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import Tensor, nn

from lm.checkpoint import CheckpointError, read_safetensors
from lm.model import Transformer

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_parameters",
           "lora_state_dict", "save_adapters", "load_adapters", "peft_config"]

ADAPTERS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
ADAPTER_DIR = "adapter"  # beside a stage's checkpoint/ (inside it, transformers would take it for the model)
_PEFT_PREFIX = "base_model.model."
# r1flow adapter tensor -> PEFT's suffix (after the HF module path).
_PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


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


def save_adapters(directory: str | Path, model: Transformer, cfg: LoraConfig,
                  base_model: str | None = None) -> Path:
    """Write the adapters alone in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`).

    `base_model` is recorded as `base_model_name_or_path` (where the Hugging Face base lives).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if any(m.merged for m in lora_modules(model).values()):
        raise ValueError("unmerge the adapters before saving them alone")
    tensors = {_peft_name(k): _to_hf_rows(k, v, model).cpu().contiguous()
               for k, v in lora_state_dict(model).items()}
    (d / ADAPTERS).write_bytes(st_save(tensors, metadata={"format": "pt"}))
    (d / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, base_model), indent=1))
    return d


def peft_config(cfg: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for `cfg` (scaling alpha / r, as `LoraConfig.scaling`)."""
    from lm.hf_write import HF_MODULES

    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(HF_MODULES[t] for t in cfg.targets), "use_dora": cfg.dora,
        "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
        "layers_pattern": None if cfg.layers is None else "layers",
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "revision": None,
    }


def load_adapters(directory: str | Path, model: Transformer) -> LoraConfig:
    """Wrap `model` as the saved (PEFT-format) adapters were and load their tensors; the base
    weights stay."""
    d = Path(directory)
    cfg_path = d / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"no adapters at {d}: {ADAPTER_CONFIG} is missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {err}") from err
    cfg = _from_peft_config(raw, cfg_path)
    tensors = read_safetensors(d / ADAPTERS)
    if not lora_modules(model):
        apply_lora(model, cfg)
    own = dict(model.named_parameters())
    expected = {_peft_name(k): k for k in lora_state_dict(model)}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors))[:5], sorted(set(tensors) - set(expected))[:5]
        raise CheckpointError(f"{d}: adapter tensors do not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for peft_name, t in tensors.items():
            name = expected[peft_name]
            p = own[name]
            if p.shape != t.shape:
                raise CheckpointError(f"{d}: adapter {peft_name!r} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(p.shape)}")
            p.copy_(_from_hf_rows(name, t, model).to(p.dtype))
    return cfg


def _from_peft_config(raw: Any, path: Path) -> LoraConfig:
    from lm.hf_write import HF_MODULES

    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: not a PEFT LoRA adapter (peft_type {raw.get('peft_type') if isinstance(raw, dict) else None!r})")
    ours = {hf: r1 for r1, hf in HF_MODULES.items()}
    targets = raw.get("target_modules") or []
    if isinstance(targets, str) or any(t not in ours for t in targets):
        raise CheckpointError(f"{path}: target_modules {targets!r} must be a list of {sorted(ours)}")
    for key, ok in (("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none"), ("modules_to_save", None)):
        if raw.get(key, ok) not in (ok, [] if ok is None else ok):
            raise CheckpointError(f"{path}: {key}={raw[key]!r} is not supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise CheckpointError(f"{path}: per-layer rank_pattern / alpha_pattern are not supported")
    layers = raw.get("layers_to_transform")
    return LoraConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout") or 0.0),
                      targets=tuple(r1 for r1 in HF_MODULES if HF_MODULES[r1] in targets), dora=bool(raw.get("use_dora")),
                      layers=None if layers is None else tuple(int(i) for i in ([layers] if isinstance(layers, int) else layers)))


def _peft_name(name: str) -> str:
    """`layers.0.attention.wq.lora_A` -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    from lm.hf_write import hf_name

    module, kind = name.rsplit(".", 1)
    return _PEFT_PREFIX + hf_name(f"{module}.weight").removesuffix(".weight") + "." + _PEFT_SUFFIX[kind]


def _rotary_heads(name: str, model: Transformer) -> int | None:
    """Head count whose rotary rows an adapter tensor's output rows follow (q / k), else None."""
    if name.endswith("lora_A"):
        return None  # input side: unchanged
    if ".attention.wq." in name:
        return model.config.n_heads
    if ".attention.wk." in name:
        return model.config.n_kv_heads
    return None


def _to_hf_rows(name: str, t: Tensor, model: Transformer) -> Tensor:
    from lm.hf_write import permute_rotary

    heads = _rotary_heads(name, model)
    return t if heads is None else permute_rotary(t, heads)


def _from_hf_rows(name: str, t: Tensor, model: Transformer) -> Tensor:
    from lm.hf import unpermute_rotary

    heads = _rotary_heads(name, model)
    return t if heads is None else unpermute_rotary(t, heads)
