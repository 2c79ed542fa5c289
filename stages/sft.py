"""The `sft` stage: supervised fine-tuning of the base model on the cold-start traces.

Where from: DeepSeek-R1 (DeepSeek-AI 2025), sec. 2.3.1: before reasoning-oriented RL, the base
model is fine-tuned on a few thousand readable long-CoT "cold start" examples so that RL starts
from a model that already writes in the readable format. The recipe is standard SFT (InstructGPT,
Ouyang et al. 2022): next-token cross-entropy on the completion tokens only (the prompt is
context, not a target), the end-of-text after the completion included so the model learns to stop.

Each row of `cold_start.parquet` is (prompt, completion): the prompt, a bare question, is rendered
with the tokenizer's chat template (`template`; None = the prompt column already holds the full
prompt text) exactly as `stages.sampling` renders it at sampling time, and the completion follows.
Rows are bucketed by length into right-padded batches; warmup + cosine schedule, gradient
clipping and accumulation, optional LoRA adapters (`lm.lora`, merged into the saved checkpoint),
a held-out validation slice whose loss is logged every `eval_every` steps.

Outputs: `checkpoint/` and `metrics.parquet` (step, name, value: loss, lr, grad_norm, tokens_per_s,
val_loss); with LoRA also `adapter/`, the adapters alone in PEFT's format. Resumes from `ctx.run_dir` with the same result as an uninterrupted run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from artifacts.store import write_table
from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.lora import ADAPTER_DIR, LoraConfig, apply_lora, lora_parameters, save_adapters
from lm.train import make_optimizer, resolve_device
from stages.context import StageContext
from stages.lm_training import (BatchPlan, fixed_batches, lm_loss_sum, read_pairs, split_by_group,
                                start_or_resume, steps_for_epochs, train_loop, validation_loss)
from stages.metrics import METRICS_SCHEMA
from stages.sampling import TemplateName

INPUTS: tuple[str, ...] = ("base", "cold_start")
SCHEMAS: dict[str, pa.Schema] = {"metrics.parquet": METRICS_SCHEMA}


class Config(BaseModel):
    """Knobs of the sft stage; defaults fine-tune the tiny preset's model in about a CPU minute."""

    model_config = ConfigDict(extra="forbid")

    template: TemplateName | None = Field("r1_zero_short", description="chat template for the prompt column; "
                                                             "None = prompts are already rendered")
    seq_len: int = Field(256, ge=8, description="max prompt + completion tokens (completions are cut)")
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps")
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, ge=0)
    autocast: bool = Field(True, description="bf16 autocast for forward/backward (fp32 master weights)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="held-out share of the rows")
    val_max: int = Field(64, ge=0, description="cap on held-out rows")
    eval_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(25, ge=1)
    lora_rank: int = Field(0, ge=0, description="0 = full fine-tuning; > 0 trains LoRA adapters only")
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: list[str] = Field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the base checkpoint on cold_start.parquet; write `out/checkpoint` and metrics."""
    t0 = time.perf_counter()
    device = resolve_device(ctx.device)
    model, tok, base_meta = load_checkpoint(inputs["base"] / "checkpoint", device=device, dtype="fp32")
    if tok is None:
        raise ValueError(f"{inputs['base'] / 'checkpoint'} has no tokenizer")
    max_len = min(cfg.seq_len, model.config.max_seq_len)
    examples, report = read_pairs(inputs["cold_start"] / "cold_start.parquet", tok, cfg.template, max_len, "sft")
    train_idx, val_idx = split_by_group([e.group for e in examples], cfg.val_fraction, cfg.val_max, ctx.seed)
    train = [examples[i] for i in train_idx]
    val_batches = fixed_batches([examples[i] for i in val_idx], cfg.batch_size, tok.pad_id)
    steps = steps_for_epochs(len(train), cfg.batch_size, cfg.grad_accum, cfg.epochs)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    ctx.log(f"sft: {len(train)} training / {len(val_idx)} validation examples, {steps} steps "
            f"({report.truncated} truncated, {report.dropped_empty + report.dropped_prompt_too_long} dropped)")

    lora = LoraConfig(r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets)) if cfg.lora_rank else None
    if lora is not None:
        torch.manual_seed(ctx.seed)  # the adapters' initial A matrices
        apply_lora(model, lora)
        ctx.log(f"sft: LoRA rank {cfg.lora_rank}: {sum(p.numel() for p in lora_parameters(model)):,} "
                "trainable parameters")
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    plan = BatchPlan([len(e) for e in train], cfg.batch_size, ctx.seed)
    state_dir, start, metrics = start_or_resume(ctx, "sft", model, optimizer, steps, "sft")
    if start == 0 and val_batches:
        metrics.add(0, val_loss=validation_loss(model, val_batches, autocast=cfg.autocast, device=device))

    train_loop(model, optimizer, train, plan, lm_loss_sum, cfg, steps=steps, start=start, metrics=metrics,
               pad_id=tok.pad_id, val_batches=val_batches, device=device, ctx=ctx, label="sft",
               state_dir=state_dir, eval_every=cfg.eval_every)

    model.eval()
    meta = {"stage": "sft", "base": base_meta, "steps": steps, "lora_rank": cfg.lora_rank, "template": cfg.template}
    save_checkpoint(out / "checkpoint", model, tok, meta)  # LoRA adapters are merged into the weights
    if lora is not None:  # and kept alone too, in PEFT's format, for `r1flow export --format peft`
        save_adapters(out / ADAPTER_DIR, model, lora)
    write_table(metrics.table(), out / "metrics.parquet", METRICS_SCHEMA)
    return {
        "final_val_loss": metrics.last("val_loss"),
        "initial_val_loss": next((r["value"] for r in metrics.rows if r["name"] == "val_loss"), None),
        "final_train_loss": metrics.tail_mean("loss", max(1, min(10, steps // 5))),
        "examples": len(train),
        "val_examples": len(val_idx),
        "dropped": report.dropped_empty + report.dropped_prompt_too_long,
        "truncated": report.truncated,
        "epochs": round(steps * cfg.batch_size * cfg.grad_accum / len(train), 3),
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 2),
    }
