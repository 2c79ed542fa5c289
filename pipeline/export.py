"""`r1flow export SOURCE OUT --format hf|gguf|peft`: take a model out of r1flow.

SOURCE is anything `r1flow generate --model` takes (`RUN_ID/STAGE`, `RUN_ID/distill/students/NAME`,
a checkpoint or artifact directory, a `.gguf` file, a Hugging Face directory, a preset), or, with
`--merge-lora`, a PEFT adapter directory whose `base_model_name_or_path` r1flow can load.

- `hf`: a self-contained Hugging Face model directory (config, safetensors, fast tokenizer with
  chat template, generation config) that transformers, vLLM and lighteval load as is.
- `gguf`: one GGUF file (llama architecture, tokenizer and chat template in its metadata) for
  llama.cpp, also readable by transformers (`gguf_file=`) and r1flow.
- `peft`: the LoRA adapter of a stage trained with adapters (sft with `lora_rank > 0`) in PEFT's
  format; `PeftModel.from_pretrained` loads it over the base model (for `RUN_ID/sft`, the run's
  base checkpoint, recorded as `base_model_name_or_path`).

Every model goes through the one loader (`lm.loading.load_model`); the output appears atomically
(written to a temporary sibling, then renamed) and an existing OUT is replaced only with `--force`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from artifacts import RunStore
from pipeline.generate import resolve_source

FORMATS = ("hf", "gguf", "peft")
DTYPES = ("fp32", "bf16", "f16", "q8_0")
_TORCH_DTYPES = {"fp32": "fp32", "bf16": "bf16", "f16": "fp16"}


class ExportError(ValueError):
    """An export the user asked for that cannot be done as asked, with the reason."""


def cmd_export(args: argparse.Namespace) -> int:
    out = export_model(args.source, Path(args.out), fmt=args.format, dtype=args.dtype,
                       merge_lora=args.merge_lora, force=args.force, root=Path(args.root))
    print(f"exported {args.source} as {args.format} to {out}")
    return 0


def export_model(source: str, out: Path, *, fmt: str, dtype: str = "fp32", merge_lora: bool = False,
                 force: bool = False, root: Path | None = None) -> Path:
    """Write SOURCE to OUT in format `fmt`; returns OUT. See the module docstring."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; use one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    if dtype == "q8_0" and fmt != "gguf":
        raise ExportError("--dtype q8_0 is a GGUF quantization: use it with --format gguf")
    if fmt == "peft" and (merge_lora or dtype != "fp32"):
        raise ExportError("--format peft writes the adapter as trained: no --merge-lora, no --dtype")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    path = resolve_source(source, root)[0] if root is not None else source
    if fmt == "peft":
        return _export_peft(source, Path(path), out, root)
    model, tok = _load(source, path, merge_lora)
    if fmt == "hf":
        from lm.checkpoint import save_checkpoint

        model = model.to(dtype=_torch_dtype(dtype))
        return save_checkpoint(out, model, tok, {"exported_from": source})
    return _write_file(out, lambda tmp: _gguf(tmp, model, tok, dtype, out.stem))


def _torch_dtype(dtype: str):
    from lm.checkpoint import resolve_dtype

    return resolve_dtype(_TORCH_DTYPES[dtype])


def _gguf(tmp: Path, model, tok, dtype: str, name: str) -> None:
    from lm.gguf_write import write_gguf

    try:
        write_gguf(tmp, model, tok, dtype=dtype, name=name)
    except ValueError as e:
        raise ExportError(str(e)) from e


def _load(source: str, path: str, merge_lora: bool):
    """(model, tokenizer) of SOURCE through the one loader; a PEFT adapter merged into its base."""
    from lm.gguf import LoadError
    from lm.loading import load_model

    p = Path(path)
    if _is_adapter(p):
        if not merge_lora:
            raise ExportError(f"{source} is a LoRA adapter, not a model: pass --merge-lora to merge it "
                              "into its base model, or export it with --format peft")
        return _merged(source, p)
    try:
        return load_model(path, dtype="fp32")
    except LoadError as e:
        raise ExportError(f"{source} has no checkpoint to export: {e}") from e


def _is_adapter(p: Path) -> bool:
    from lm.lora import ADAPTER_CONFIG, ADAPTERS

    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and (p / ADAPTERS).is_file()


def _merged(source: str, adapter: Path):
    from lm.lora import ADAPTER_CONFIG, load_adapters, merge_lora
    from lm.loading import load_model

    base = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ExportError(f"{source}: the adapter names no base model (base_model_name_or_path)")
    model, tok = load_model(str(base), dtype="fp32")
    load_adapters(adapter, model)
    merge_lora(model)
    return model, tok


def _export_peft(source: str, path: Path, out: Path, root: Path | None) -> Path:
    from lm.checkpoint import atomic_dir
    from lm.lora import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTERS

    adapter = path if _is_adapter(path) else path / ADAPTER_DIR
    if not _is_adapter(adapter):
        raise ExportError(f"{source} has no LoRA adapter to export as PEFT (train sft with "
                          "--set sft.lora_rank=8, or export the full model with --format hf)")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = _base_of(source, root) or config.get("base_model_name_or_path")
    with atomic_dir(out) as tmp:
        shutil.copyfile(adapter / ADAPTERS, tmp / ADAPTERS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
    return out


def _base_of(source: str, root: Path | None) -> str | None:
    """The checkpoint an adapter of `RUN_ID/sft` was trained over: that run's base checkpoint."""
    parts = source.strip("/").split("/")
    if root is None or len(parts) != 2 or parts[1] != "sft" or Path(source).exists():
        return None
    runs = RunStore(root)
    if not runs.exists(parts[0]):
        return None
    entry = runs.load(parts[0]).stages.get("base")
    return str(Path(entry.path) / "checkpoint") if entry is not None and entry.path else None


def _write_file(out: Path, write) -> Path:
    """Call `write(tmp)` on a temporary sibling of `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
