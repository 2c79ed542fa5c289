"""The `dpo` stage: direct preference optimisation of the rl_reasoning checkpoint on the
rejection-sampling pairs (off by default; `dpo.enabled = true` turns it on).

Where from: not in DeepSeek-R1 (which used no preference optimisation); DPO (Rafailov et al.
2023) and IPO (Azar et al. 2024) as the consumer of `preference_pairs.parquet`, whose pairs are a
kept correct completion (`chosen`) and an incorrect one (`rejected`) of one prompt. The losses
are `stages/dpo_loss.py` (`DPO_LOSSES`, picked by `loss`); the reference model is a frozen copy of
the starting checkpoint, so its sequence log-probs are computed once, before training.

Each step takes `batch_size` pairs (a seeded, length-bucketed plan, `lm_training.BatchPlan`),
scores chosen and rejected completions (the prompt rendered with `template` as sampling renders
it; loss on the completion and its end-of-text, as SFT) in one forward, and takes one AdamW step
(warmup + cosine, gradient clipping). Before and after training the margin (mean chosen-minus-
rejected log-ratio, log π_θ/π_ref) and the pair accuracy over every pair are measured: the
summary's `initial_margin` / `final_margin`.

Disabled, the stage writes an empty metrics table and no checkpoint (`evaluate` then has no `dpo`
row). Enabled with no usable pair (a small run whose samples were never both right and wrong),
the checkpoint is the starting one, unchanged, and the summary says `steps: 0`.

Outputs: `checkpoint/` (when enabled) and `metrics.parquet` (step, name, value: loss, margin,
reward_chosen, reward_rejected, accuracy, lr, grad_norm; eval/margin and eval/accuracy at the
start and end). Resumes from `ctx.run_dir` as the other training stages do.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from artifacts.store import read_table, write_table
from lm.checkpoint import load_checkpoint, save_checkpoint
from lm.logprobs import token_logprobs
from lm.model import Transformer
from lm.chat_template import TEMPLATE_NAMES
from lm.tokenizer import Tokenizer
from lm.train import autocast_context, check_finite, clip_grad, make_optimizer, resolve_device, set_lr
from stages.context import StageContext
from stages.dpo_loss import DPO_LOSSES, dpo_loss, sequence_logps
from stages.lm_training import (BatchPlan, Example, Metrics, collate, file_prompts, lr_schedule, plain_text_columns,
                                render_prompts, save_resume, start_or_resume, tokenize_pairs)
from stages.metrics import METRICS_SCHEMA
from stages.sampling import find_checkpoint

INPUTS: tuple[str, ...] = ("rl_reasoning", "rejection_sampling")
SCHEMAS: dict[str, pa.Schema] = {"metrics.parquet": METRICS_SCHEMA}
PAIRS_FILE = "preference_pairs.parquet"


class Config(BaseModel):
    """Knobs of the dpo stage; defaults suit the tiny preset."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="run DPO after rejection_sampling (off: no checkpoint)")
    loss: Literal[tuple(DPO_LOSSES)] = Field("sigmoid", description="sigmoid (DPO) | ipo")
    beta: float = Field(0.1, gt=0, description="β: DPO's KL strength; IPO's τ (target margin 1/(2β))")
    template: str | None = Field("r1_zero_short", description="chat template for the prompt column")
    seq_len: int = Field(256, ge=8, description="max prompt + completion tokens (completions are cut)")
    steps: int = Field(50, ge=1)
    batch_size: int = Field(8, ge=1, description="pairs per step")
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, ge=0)
    autocast: bool = Field(True, description="bf16 autocast for the forwards (fp32 master weights) where the device does bf16 natively")
    eval_batch_size: int = Field(16, ge=1, description="pairs per no-grad forward (reference, margins)")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(25, ge=1)

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        if v is not None and v not in TEMPLATE_NAMES:
            raise ValueError(f"unknown template {v!r}; known: {sorted(TEMPLATE_NAMES)} (or None)")
        return v


@dataclass(frozen=True)
class Pair:
    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def tokenize_preference_pairs(tok: Tokenizer, prompts: Sequence[str], chosen: Sequence[str],
                              rejected: Sequence[str], max_len: int) -> tuple[list[Pair], int]:
    """(pairs whose both sides tokenised, pairs dropped): each side as `tokenize_pairs` makes an SFT
    example (loss on completion + end-of-text); a pair with an empty or unusable side is dropped."""
    pairs, dropped = [], 0
    for p, c, r in zip(prompts, chosen, rejected):
        ex, _ = tokenize_pairs(tok, [p, p], [c, r], max_len)
        if len(ex) == 2:
            pairs.append(Pair(ex[0], ex[1]))
        else:
            dropped += 1
    return pairs, dropped


def pair_logps(model: Transformer, pairs: Sequence[Pair], pad_id: int, device: str) -> tuple[Tensor, Tensor]:
    """Sequence log-probs ([n], [n]) of the chosen and rejected completions, in one forward."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id).to(device)
    lp = token_logprobs(model, batch.ids, batch.attention, batch.loss_mask)  # [2n, T]
    seq = sequence_logps(lp, batch.loss_mask)  # [2n]
    return seq[:len(pairs)], seq[len(pairs):]


@torch.no_grad()
def all_pair_logps(model: Transformer, pairs: Sequence[Pair], pad_id: int, device: str, batch_size: int,
                   autocast: bool) -> tuple[Tensor, Tensor]:
    """`pair_logps` over every pair, `batch_size` pairs per forward, without autograd."""
    was_training = model.training
    model.eval()
    cs, rs = [], []
    for i in range(0, len(pairs), batch_size):
        with autocast_context(device, "bf16" if autocast else "fp32"):
            c, r = pair_logps(model, pairs[i:i + batch_size], pad_id, device)
        cs.append(c.float())
        rs.append(r.float())
    model.train(was_training)
    return torch.cat(cs), torch.cat(rs)  # [N], [N]


def margin_stats(policy: tuple[Tensor, Tensor], reference: tuple[Tensor, Tensor]) -> dict[str, float]:
    """Mean chosen-minus-rejected log-ratio margin and the share of pairs where it is positive."""
    d = (policy[0] - reference[0]) - (policy[1] - reference[1])  # [N]
    return {"margin": float(d.mean()), "accuracy": float((d > 0).float().mean())}


def train_dpo(cfg: Config, policy: Transformer, pairs: list[Pair], pad_id: int, device: str,
              ctx: StageContext) -> Metrics:
    """`cfg.steps` steps of DPO/IPO on `pairs` against a frozen copy of `policy` as it is now."""
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    ref = all_pair_logps(reference, pairs, pad_id, device, cfg.eval_batch_size, cfg.autocast)  # [N], [N]
    del reference
    loss_fn = DPO_LOSSES[cfg.loss]
    policy.train()
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    state_dir, start, metrics = start_or_resume(ctx, "dpo", policy, optimizer, cfg.steps, "dpo")
    if start == 0:
        start_stats = margin_stats(all_pair_logps(policy, pairs, pad_id, device, cfg.eval_batch_size, cfg.autocast), ref)
        metrics.add(0, **{f"eval/{k}": v for k, v in start_stats.items()})
    plan = BatchPlan([len(p) for p in pairs], cfg.batch_size, ctx.seed)
    for step in ctx.progress(range(start, cfg.steps), desc="dpo", total=cfg.steps - start):
        lr = lr_schedule(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        idx = plan.step(step, 1)[0]
        batch = [pairs[i] for i in idx]
        t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, "bf16" if cfg.autocast else "fp32"):
            chosen, rejected = pair_logps(policy, batch, pad_id, device)  # [b], [b]
        loss, m = dpo_loss(chosen.float(), rejected.float(), ref[0][t].to(device), ref[1][t].to(device),
                           beta=cfg.beta, num_pairs=len(batch), loss=loss_fn)
        check_finite("DPO loss", loss, step)
        loss.backward()
        grad_norm = clip_grad(policy, cfg.clip)
        check_finite("gradient norm", grad_norm, step)
        optimizer.step()
        metrics.add(step + 1, **{k: float(v) for k, v in m.items()}, lr=lr, grad_norm=grad_norm)
        done = step + 1
        if done % cfg.log_every == 0:
            ctx.log(f"dpo: step {done}/{cfg.steps} loss {metrics.tail_mean('loss', cfg.log_every):.4f} "
                    f"margin {metrics.tail_mean('margin', cfg.log_every):.3f}")
        if done == cfg.steps:
            end = margin_stats(all_pair_logps(policy, pairs, pad_id, device, cfg.eval_batch_size, cfg.autocast), ref)
            metrics.add(done, **{f"eval/{k}": v for k, v in end.items()})
        if state_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            save_resume(state_dir, policy, optimizer, done, metrics)
    policy.eval()
    return metrics


def _first(metrics: Metrics, name: str) -> float | None:
    return next((r["value"] for r in metrics.rows if r["name"] == name), None)


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    """Train the rl_reasoning checkpoint on preference_pairs.parquet; write `out/checkpoint` and
    metrics.parquet (only the empty metrics table when disabled)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.enabled:
        write_table(Metrics().table(), out / "metrics.parquet", METRICS_SCHEMA)
        ctx.log("dpo: disabled (set dpo.enabled = true to train on the preference pairs)")
        return {"enabled": False}
    t0 = time.perf_counter()
    device = resolve_device(ctx.device)
    start_dir = find_checkpoint(inputs["rl_reasoning"])
    policy, tok, start_meta = load_checkpoint(start_dir, device=device, dtype="fp32")
    if tok is None:
        raise ValueError(f"{start_dir} has no tokenizer")
    path = Path(inputs["rejection_sampling"]) / PAIRS_FILE
    names = ("prompt", "chosen", "rejected")
    columns = plain_text_columns(path, names)
    table = read_table(path, pa.schema([pa.field(c, pa.string()) for c in columns]), columns=columns)
    cols = {n: [v or "" for v in table.column(c).to_pylist()] for n, c in zip(names, columns)}
    max_len = min(cfg.seq_len, policy.config.max_seq_len)
    prompts = render_prompts(tok, file_prompts(path, cols["prompt"], cfg.template), cfg.template)
    pairs, dropped = tokenize_preference_pairs(tok, prompts, cols["chosen"], cols["rejected"], max_len)
    meta = {"stage": "dpo", "start": start_meta, "loss": cfg.loss, "beta": cfg.beta}
    if not pairs:
        ctx.log(f"dpo: {path} holds no usable pair ({table.num_rows} rows, {dropped} dropped): "
                "the checkpoint is the rl_reasoning one, unchanged")
        save_checkpoint(out / "checkpoint", policy, tok, meta | {"steps": 0})
        write_table(Metrics().table(), out / "metrics.parquet", METRICS_SCHEMA)
        return {"enabled": True, "pairs": 0, "dropped": dropped, "steps": 0}
    ctx.log(f"dpo: {len(pairs)} pairs ({dropped} dropped), {cfg.steps} steps of {cfg.batch_size}, "
            f"loss {cfg.loss}, β={cfg.beta}")
    metrics = train_dpo(cfg, policy, pairs, tok.pad_id, device, ctx)
    save_checkpoint(out / "checkpoint", policy, tok, meta | {"steps": cfg.steps})
    write_table(metrics.table(), out / "metrics.parquet", METRICS_SCHEMA)
    return {
        "enabled": True,
        "pairs": len(pairs),
        "dropped": dropped,
        "steps": cfg.steps,
        "initial_margin": _first(metrics, "eval/margin"),
        "final_margin": metrics.last("eval/margin"),
        "initial_accuracy": _first(metrics, "eval/accuracy"),
        "final_accuracy": metrics.last("eval/accuracy"),
        "final_loss": metrics.tail_mean("loss", max(1, min(10, cfg.steps // 5))),
        "seconds": round(time.perf_counter() - t0, 2),
    }
