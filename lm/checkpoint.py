"""Checkpoints as Hugging Face model directories: loading one never runs pickled code.

Layout of a checkpoint directory (what `AutoModelForCausalLM.from_pretrained`, vLLM and lighteval
load as is; nanochat's checkpoint_manager idea of weights, config and metadata side by side, with
compatibility checks in one loader):

    config.json             a LlamaConfig / Qwen2Config (`lm.hf_write.hf_config`)
    generation_config.json  BOS / EOS / PAD
    model.safetensors       the weights under HF names, q/k rows in HF's rotate-half layout
    tokenizer.json          the HF fast tokenizer equivalent to r1flow's tiktoken encoding
    tokenizer_config.json   special tokens by role, add_bos_token, the chat template
    r1flow.json             r1flow's own: {"format", "dtype", "meta": caller's dict}

Loading converts back through `lm.hf`'s name map and rotary un-permutation, then checks every
tensor against the config (names, shapes, the dtype `r1flow.json` declares).

Resume state for training (optimizer moments, step, RNG states) is written beside it, also
without pickle: tensors in `train_state.safetensors`, everything else in `train_state.json`.
`save_resume` / `load_resume` are the one resume helper every training loop (base, sft, distill,
GRPO) uses: weights + training state + the loop's own JSON `extra` in a `step-<n>/` folder behind
an atomically replaced `LATEST` pointer.

Every write goes to a temporary sibling directory and is renamed into place, so a crash leaves
the previous checkpoint intact (the "last good checkpoint" the non-finite guard relies on).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from lm.model import ModelConfig, Transformer, shape_mismatches
from lm.tokenizer import Tokenizer

__all__ = ["save_checkpoint", "load_checkpoint", "load_tokenizer", "read_meta", "is_checkpoint",
           "save_training_state", "load_training_state", "save_resume", "load_resume", "CheckpointError",
           "resolve_dtype", "read_safetensors", "export_state_dict", "expected_shapes"]

FORMAT = "r1flow-checkpoint-v2"
WEIGHTS, CONFIG, META = "model.safetensors", "config.json", "r1flow.json"
STATE_TENSORS, STATE_JSON = "train_state.safetensors", "train_state.json"
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed, or not what the model expects."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


# ---- atomic directories -------------------------------------------------------------------------


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `target`; on success it replaces `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- model checkpoints --------------------------------------------------------------------------


def export_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The plain Transformer state_dict, contiguous and detached.

    Modules wrapped with adapters (lm/lora.py) expose `merged_weight()`; their merged weight is
    saved under the plain name and the adapter tensors are left out, so any checkpoint loads into
    a plain `Transformer`. (Save adapters alone with `lm.lora.save_adapters`.)
    """
    expected = set(expected_shapes(model.config))
    sd = {k: v for k, v in model.state_dict().items() if k in expected}
    for name, module in model.named_modules():
        merged = getattr(module, "merged_weight", None)
        if callable(merged):
            sd[f"{name}.weight"] = merged()
    missing = expected - set(sd)
    if missing:
        raise CheckpointError(f"model lacks tensors {sorted(missing)[:5]}")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state_dict key of `Transformer(cfg)` with its shape, without building anything."""
    return cfg.param_shapes()


def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Tokenizer | None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write `directory` atomically as a Hugging Face model directory (see the module docstring)
    with `meta` (which must be JSON-able) in `r1flow.json`. Returns the directory."""
    from lm.hf_write import hf_files, hf_tensors

    target = Path(directory)
    sd = export_state_dict(model)
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"mixed parameter dtypes {sorted(map(str, dtypes))}; cast the model first")
    dtype = dtypes.pop()
    own = json.dumps({"format": FORMAT, "dtype": _dtype_name(dtype), "meta": meta or {}},
                     indent=1, sort_keys=True)  # fails early on a non-JSON meta
    files = hf_files(model.config, tokenizer, dtype)
    tensors = hf_tensors(sd, model.config)
    with atomic_dir(target) as tmp:
        (tmp / WEIGHTS).write_bytes(st_save(tensors, metadata={"format": "pt"}))
        for name, text in files.items():
            (tmp / name).write_text(text)
        (tmp / META).write_text(own)
    return target


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = "fp32") -> tuple[Transformer, Tokenizer | None, dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint`, checking every tensor.

    Args:
        directory: the checkpoint directory.
        device: where the model goes.
        dtype: "fp32" / "bf16" / "fp16" / a torch dtype / "auto" (the stored dtype).

    Returns:
        (model in eval mode, tokenizer or None if the checkpoint has none, meta dict).

    Raises:
        CheckpointError: missing directory/files, a pickle file instead of safetensors, unknown
            format, missing or unexpected tensors, wrong shapes, wrong dtypes, a tokenizer larger
            than the embedding.
    """
    from lm.gguf import LoadError
    from lm.hf import _r1flow_name, hf_model_config, hf_state_dict, load_hf_tokenizer

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    own = _read_meta(d)
    try:
        stored = resolve_dtype(own["dtype"])
    except ValueError as err:
        raise CheckpointError(f"{d / META}: dtype: {err}") from None
    try:
        cfg = hf_model_config(_read_json(d / CONFIG))  # sizes checked before anything is built
        tensors = read_safetensors(d / WEIGHTS)
        _validate_tensors({_r1flow_name(k): v for k, v in tensors.items()}, cfg, stored, d / WEIGHTS)
        sd = hf_state_dict(tensors, cfg, dtype=None)
        tokenizer = load_hf_tokenizer(d) if (d / "tokenizer.json").is_file() else None
    except LoadError as err:
        raise CheckpointError(f"{d}: {err}") from err
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    target = stored if dtype == "auto" else resolve_dtype(dtype)
    model = model.to(device=device, dtype=target).eval()
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{d}: tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{cfg.vocab_size} embedding rows")
    return model, tokenizer, own["meta"]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint alone (its `tokenizer.json`), without loading the weights."""
    from lm.gguf import LoadError
    from lm.hf import load_hf_tokenizer

    d = Path(directory)
    _read_meta(d)
    if not (d / "tokenizer.json").is_file():
        raise CheckpointError(f"{d} has no tokenizer (tokenizer.json is missing)")
    try:
        return load_hf_tokenizer(d)
    except LoadError as err:
        raise CheckpointError(f"{d}: {err}") from err


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The caller's `meta` dict of a checkpoint (from `r1flow.json`), without loading weights."""
    return _read_meta(Path(directory))["meta"]


def is_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds an r1flow checkpoint (an `r1flow.json` of this format)."""
    try:
        _read_meta(Path(directory))
    except CheckpointError:
        return False
    return True


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def _read_meta(d: Path) -> dict[str, Any]:
    path = d / META
    if not path.is_file():
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES) if d.is_dir() else []
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise CheckpointError(f"{d} is not an r1flow checkpoint: {META} is missing{hint}")
    own = _read_json(path)
    fmt = own.get("format") if isinstance(own, dict) else None
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r} (expected {FORMAT!r}; "
                              "checkpoints of older r1flow versions are not read: rerun the stage)")
    for key in ("dtype", "meta"):
        if key not in own:
            raise CheckpointError(f"{path} lacks the {key!r} entry")
    return own


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file, refusing anything else (a pickle or zip in disguise)."""
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.iterdir() if p.suffix in _PICKLE_SUFFIXES) \
            if path.parent.is_dir() else []
        hint = f"; found {siblings}, which are pickle files and are never loaded" if siblings else ""
        raise CheckpointError(f"weights file {path} is missing{hint}")
    data = path.read_bytes()
    # safetensors: an 8-byte little-endian header length, then the JSON header. Its first bytes
    # are a length and may read as "PK" or 0x80, so judge them only when no JSON header follows.
    if len(data) < 9 or data[8:9] != b"{":
        if data[:2] == b"PK" or data[:1] == b"\x80":
            raise CheckpointError(f"{path} is a pickle/zip (torch.save) file, not safetensors; "
                                  "it will not be unpickled")
        raise CheckpointError(f"{path} is not a safetensors file (bad header)")
    try:
        return st_load(data)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} is a corrupt safetensors file: {err}") from err


def _validate_tensors(tensors: dict[str, Tensor], cfg: ModelConfig, dtype: torch.dtype, path: Path) -> None:
    problems = shape_mismatches(cfg, {k: tuple(v.shape) for k, v in tensors.items()})
    if problems:
        raise CheckpointError(f"{path}: the tensors do not fit config.json: " + "; ".join(problems))
    for name, t in tensors.items():
        if t.dtype != dtype:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected {dtype} "
                                  f"(as declared in {META})")


# ---- training state for resume ------------------------------------------------------------------


def save_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, step: int,
                        extra: dict[str, Any] | None = None,
                        generators: dict[str, torch.Generator] | None = None) -> Path:
    """Write the optimizer's state, `step`, the global RNG states (python, numpy, torch, cuda) and
    any named `generators` into `directory` (atomically; tensors in safetensors, the rest JSON)."""
    tensors: dict[str, Tensor] = {}
    osd = optimizer.state_dict()
    state_json: dict[str, dict[str, Any]] = {}
    for idx, pstate in osd["state"].items():
        state_json[str(idx)] = {}
        for key, value in pstate.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                state_json[str(idx)][key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, gen in (generators or {}).items():
        tensors[f"generator.{name}"] = gen.get_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    doc = {
        "format": "r1flow-train-state-v1",
        "step": int(step),
        "extra": extra or {},
        "optim_param_groups": osd["param_groups"],
        "optim_state": state_json,
        "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
        "rng_numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "generators": sorted((generators or {})),
    }
    text = json.dumps(doc)
    target = Path(directory)
    with atomic_dir(target) as tmp:
        (tmp / STATE_TENSORS).write_bytes(st_save(tensors))
        (tmp / STATE_JSON).write_text(text)
    return target


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer,
                        generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns {"step": int, "extra": dict}."""
    d = Path(directory)
    path = d / STATE_JSON
    if not path.is_file():
        raise CheckpointError(f"no training state at {d}: {STATE_JSON} is missing")
    doc = json.loads(path.read_text())
    if doc.get("format") != "r1flow-train-state-v1":
        raise CheckpointError(f"{path}: unknown training-state format {doc.get('format')!r}")
    tensors = read_safetensors(d / STATE_TENSORS)
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in doc["optim_state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    groups = doc["optim_param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{d}: optimizer state does not fit this optimizer: {err}") from err
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    for name, gen in (generators or {}).items():
        key = f"generator.{name}"
        if key not in tensors:
            raise CheckpointError(f"{d}: no saved state for generator {name!r}")
        gen.set_state(tensors[key])
    v, internal, gauss = doc["rng_python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = doc["rng_numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return {"step": doc["step"], "extra": doc["extra"]}


_LATEST = "LATEST"
_RESUME_WEIGHTS = "weights.safetensors"


def save_resume(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                extra: dict[str, Any]) -> None:
    """Save everything a resumed loop needs to continue as if never stopped, into `directory`.

    Each save is a fresh `step-<n>/` folder (the model's state_dict as it is, LoRA adapters
    included, plus `save_training_state`: optimizer moments, step, RNG states and the loop's
    JSON-able `extra`, e.g. its metric rows); the `LATEST` pointer is replaced atomically only
    after the folder is complete, then older folders go. A crash at any point leaves the previous
    complete state as the one `load_resume` finds.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    target = directory / name
    save_training_state(target / "state", optimizer, step, extra=extra)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = target / f".{_RESUME_WEIGHTS}.tmp"
    tmp.write_bytes(st_save(sd))
    os.replace(tmp, target / _RESUME_WEIGHTS)
    pointer = directory / f".{_LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, directory / _LATEST)
    for old in directory.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def load_resume(directory: Path | None, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]] | None:
    """Restore the latest state `save_resume` wrote into `model` and `optimizer`; None when there
    is none (a fresh start).

    Returns:
        (the number of steps already done, the `extra` saved with them).
    """
    if directory is None or not (directory / _LATEST).is_file():
        return None
    target = directory / (directory / _LATEST).read_text().strip()
    weights = read_safetensors(target / _RESUME_WEIGHTS)
    device = next(iter(model.parameters())).device
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"resume state {target} does not fit this model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}; delete {directory} to start over")
    state = load_training_state(target / "state", optimizer)
    return int(state["step"]), state["extra"]
