"""The outcome reward model (ORM): a value head that judges a sampled completion correct or not.

Where from: the verifiers of Cobbe et al. 2021 ("Training Verifiers to Solve Math Word Problems"),
called outcome-supervised reward models by Uesato et al. 2022 and Lightman et al. 2023: a model
initialised from the generator, trained on the generator's own samples labelled by whether their
final answer is correct, and used at test time to rerank samples (best-of-n) or weight their votes
(Wu et al. 2024, "Inference Scaling Laws", §3). Here, as an option of `rejection_sampling`
(`rejection_sampling.orm.enabled = true`):

- the model is `lm.value.ValueModel` on a copy of the rl_reasoning checkpoint the stage samples from
  (zero-initialised head: every probability starts at 0.5); its score is the head's logit at the
  completion's last token, read after the prompt (rendered with the stage's template) and the
  completion;
- the data is every candidate the stage sampled, correct and incorrect, before the readability
  filters (label = accuracy reward 1, as `rejection_sampling.is_correct`); whole prompts are held
  out (`holdout`) for the held-out loss, accuracy (p > 0.5) and ROC AUC;
- the loss is binary cross-entropy on that logit (`orm_loss`), AdamW with warmup + cosine,
  gradient clipping, as the other training stages.

Departures: Cobbe et al. predict at every token and add the language-modelling loss; here only the
last token is scored and there is no LM term (the smallest model that answers "is this correct?").

`evaluate` scores every sample with `OutcomeRewardModel.probabilities` (the ORM's own template and
tokenizer: it reads text, so it scores any checkpoint's samples) for ORM-weighted voting and
best-of-k.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from lm.checkpoint import load_checkpoint
from lm.tokenizer import Tokenizer
from lm.train import autocast_context, check_finite, clip_grad, make_optimizer, resolve_device, set_lr
from lm.value import ValueModel, load_value_model, save_value_model
from stages.context import StageContext
from stages.lm_training import BatchPlan, Example, Metrics, collate, encode_prompt, encode_text, lr_schedule, split_by_group

DIR = "orm"  # inside the rejection_sampling artifact
METRICS_FILE = "orm_metrics.parquet"


class OrmConfig(BaseModel):
    """Knobs of the outcome reward model (`rejection_sampling.orm`); off by default."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="train an ORM on the sampled candidates' correctness")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1, description="candidates per step")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    clip: float = Field(1.0, ge=0)
    autocast: bool = Field(True, description="bf16 autocast for the forwards (fp32 master weights) where the device does bf16 natively")
    seq_len: int = Field(256, ge=8, description="max prompt + completion tokens (longer: the prompt's start is cut)")
    holdout: float = Field(0.2, ge=0, lt=1, description="share of the candidates (whole prompts) held out")
    eval_batch_size: int = Field(32, ge=1)
    log_every: int = Field(10, ge=1)


# ---- losses and measures ------------------------------------------------------------------------


def orm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Binary cross-entropy of the ORM's last-token logits against correctness labels.

    Args:
        logits: [B] scores; sigmoid(logit) is the predicted probability of "correct".
        labels: [B] 1.0 for a correct completion, 0.0 for an incorrect one.

    Returns:
        (mean BCE over the batch, detached metrics: accuracy of p > 0.5, mean probability).
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    with torch.no_grad():
        metrics = {"accuracy": ((logits > 0).float() == labels.float()).float().mean(),
                   "prob": torch.sigmoid(logits.float()).mean()}
    return loss, metrics


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC by the Mann-Whitney count: the share of (correct, incorrect) pairs in which the
    correct sample scores higher, ties counting half; None without both classes."""
    pos = np.asarray([s for s, y in zip(scores, labels) if y], dtype=np.float64)
    neg = np.asarray([s for s, y in zip(scores, labels) if not y], dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


# ---- inputs and scoring -------------------------------------------------------------------------


def encode(tok: Tokenizer, prompt: str, completion: str, max_len: int) -> np.ndarray:
    """Token ids of a rendered prompt followed by its completion, as the sampler produced them
    (`encode_prompt` + `encode_text`); the last `max_len` when longer (the end is what is judged)."""
    ids = encode_prompt(tok, prompt) + encode_text(tok, completion)
    return np.asarray(ids[-max_len:], dtype=np.int64)


def last_token_logits(model: ValueModel, sequences: Sequence[np.ndarray], pad_id: int, device: str) -> Tensor:
    """The head's value at each sequence's last token: [B] logits (right padding, causal: no mask)."""
    batch = collate([Example(s, np.zeros(len(s), dtype=bool)) for s in sequences], pad_id)
    values = model(batch.ids.to(device))  # [B, T]
    last = batch.attention.sum(dim=1).to(device) - 1  # [B]
    return values.gather(1, last[:, None]).squeeze(1)  # [B]


@torch.no_grad()
def score_all(model: ValueModel, sequences: Sequence[np.ndarray], pad_id: int, device: str, batch_size: int,
              autocast: bool) -> list[float]:
    """`last_token_logits` of every sequence, `batch_size` at a time, without autograd."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(sequences), batch_size):
        with autocast_context(device, "bf16" if autocast else "fp32"):
            out += last_token_logits(model, sequences[i:i + batch_size], pad_id, device).float().tolist()
    model.train(was_training)
    return out


def measure(logits: Sequence[float], labels: Sequence[bool]) -> dict[str, float]:
    """BCE, accuracy (p > 0.5) and ROC AUC (NaN without both classes) of scores against labels."""
    t, y = torch.tensor(list(logits), dtype=torch.float64), torch.tensor([float(v) for v in labels], dtype=torch.float64)
    auc = roc_auc(list(logits), list(labels))
    return {"loss": float(F.binary_cross_entropy_with_logits(t, y)),
            "accuracy": float(((t > 0).double() == y).double().mean()),
            "auc": float("nan") if auc is None else auc}


# ---- training -----------------------------------------------------------------------------------


def train_orm(cfg: OrmConfig, model: ValueModel, sequences: list[np.ndarray], labels: list[bool], groups: list[str],
              pad_id: int, device: str, ctx: StageContext) -> Metrics:
    """`cfg.steps` AdamW steps of `orm_loss` on the candidates outside the held-out prompts.

    Metrics rows: loss, accuracy, lr, grad_norm per step; eval/loss, eval/accuracy, eval/auc on
    the held-out candidates at step 0 and after the last step (none when nothing is held out).
    """
    train_idx, val_idx = split_by_group(groups, cfg.holdout, None, ctx.seed)
    train = [sequences[i] for i in train_idx]
    y = torch.tensor([float(labels[i]) for i in train_idx])  # [N]
    val = [sequences[i] for i in val_idx]
    val_labels = [labels[i] for i in val_idx]
    metrics = Metrics()

    def held_out(step: int) -> None:
        if val:
            m = measure(score_all(model, val, pad_id, device, cfg.eval_batch_size, cfg.autocast), val_labels)
            metrics.add(step, **{f"eval/{k}": v for k, v in m.items()})

    held_out(0)
    model.train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    plan = BatchPlan([len(s) for s in train], cfg.batch_size, ctx.seed)
    for step in ctx.progress(range(cfg.steps), desc="orm", total=cfg.steps):
        lr = lr_schedule(step, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        idx = plan.step(step, 1)[0]
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, "bf16" if cfg.autocast else "fp32"):
            logits = last_token_logits(model, [train[i] for i in idx], pad_id, device)  # [b]
        loss, m = orm_loss(logits, y[torch.as_tensor(np.asarray(idx), dtype=torch.long)].to(device))
        check_finite("ORM loss", loss, step)
        loss.backward()
        grad_norm = clip_grad(model, cfg.clip)
        check_finite("gradient norm", grad_norm, step)
        optimizer.step()
        scalars = {"loss": float(loss.detach()), **{k: float(v) for k, v in m.items()}, "lr": lr, "grad_norm": grad_norm}
        metrics.add(step + 1, **scalars)
        ctx.track(step + 1, scalars)
        if (step + 1) % cfg.log_every == 0:
            ctx.log(f"orm: step {step + 1}/{cfg.steps} loss {metrics.tail_mean('loss', cfg.log_every):.4f}")
    model.eval()
    held_out(cfg.steps)
    return metrics


def fit(cfg: OrmConfig, checkpoint_dir: Path, prompts: Sequence[str], completions: Sequence[str],
        labels: Sequence[bool], groups: Sequence[str], template: str, out: Path,
        ctx: StageContext) -> tuple[Metrics, dict[str, Any]]:
    """Train an ORM from the checkpoint in `checkpoint_dir` on (question, completion, label) rows
    and save it to `out` (`lm.value.save_value_model`); return its metrics and summary entries.

    Args:
        prompts: the questions (or chat messages) as the sampler rendered them with `template`.
        groups: each row's prompt id: rows of one prompt stay on one side of the held-out split.
    """
    if not prompts:
        raise ValueError("rejection_sampling.orm: no sampled candidates to train the ORM on")
    device = resolve_device(ctx.device)
    trunk, tok, start_meta = load_checkpoint(checkpoint_dir, device=device, dtype="fp32")
    if tok is None:
        raise ValueError(f"{checkpoint_dir} has no tokenizer")
    max_len = min(cfg.seq_len, trunk.config.max_seq_len)
    sequences = [encode(tok, tok.render_prompt(p, template), c, max_len) for p, c in zip(prompts, completions)]
    model = ValueModel(trunk).to(device)
    positive = float(np.mean(labels))
    ctx.log(f"orm: {len(sequences)} candidates ({positive:.1%} correct), {cfg.steps} steps of {cfg.batch_size}")
    if positive in (0.0, 1.0):
        ctx.log("orm: every candidate has the same label: the ORM can only learn a constant")
    metrics = train_orm(cfg, model, sequences, list(labels), list(groups), tok.pad_id, device, ctx)
    save_value_model(out, model, tok, {"stage": "rejection_sampling", "kind": "orm", "start": start_meta,
                                       "template": template, "seq_len": max_len, "steps": cfg.steps})
    summary = {
        "orm_candidates": len(sequences),
        "orm_positive_rate": round(positive, 6),
        "orm_steps": cfg.steps,
        "orm_final_loss": metrics.tail_mean("loss", max(1, min(10, cfg.steps // 5))),
        "orm_heldout_accuracy": metrics.last("eval/accuracy"),
        "orm_heldout_auc": _finite(metrics.last("eval/auc")),
        "orm_heldout_loss": metrics.last("eval/loss"),
    }
    return metrics, summary


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


# ---- use at evaluation --------------------------------------------------------------------------


@dataclass
class OutcomeRewardModel:
    """A trained ORM ready to score (question, completion) texts."""

    model: ValueModel
    tok: Tokenizer
    template: str
    seq_len: int
    device: str
    batch_size: int = 32

    def probabilities(self, questions: Sequence[Any], completions: Sequence[str]) -> list[float]:
        """P(correct) of each completion to its question (a string or chat messages), in order."""
        seqs = [encode(self.tok, self.tok.render_prompt(q, self.template), c, self.seq_len)
                for q, c in zip(questions, completions)]
        logits = score_all(self.model, seqs, self.tok.pad_id, self.device, self.batch_size, autocast=False)
        return torch.sigmoid(torch.tensor(logits, dtype=torch.float64)).tolist()


def find(artifact: Path | None, device: str) -> OutcomeRewardModel | None:
    """The ORM saved in a rejection_sampling artifact, or None when it has none (ORM disabled)."""
    if artifact is None or not (Path(artifact) / DIR).is_dir():
        return None
    model, tok, meta = load_value_model(Path(artifact) / DIR, device=resolve_device(device), dtype="fp32")
    if tok is None:
        raise ValueError(f"{Path(artifact) / DIR} has no tokenizer")
    return OutcomeRewardModel(model, tok, meta["template"], int(meta["seq_len"]), resolve_device(device))
