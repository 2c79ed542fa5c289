"""The `base` stage: the model every later stage starts from.

Two modes (DESIGN.md stage table, issue 8):

- ``source = "scratch"`` (the embedded default): train the project's byte-level BPE
  (`lm.tokenizer.train_bpe`) on the problems stage's `corpus.parquet`, build a `Transformer` of an
  lm preset ("tiny") and pretrain it on the corpus: each document (prompt + completion as the
  corpus renders it) followed by end-of-text, next-token loss on every token, AdamW with linear
  warmup and cosine decay (the GPT-3 schedule), gradient clipping, bf16 autocast. The corpus is
  deliberately noisy (wrong steps, missing tags, language drift: `stages.synthetic`), so the model
  this produces starts where R1-Zero's base did: modest accuracy, inconsistent format, mixing.
- any other source: a pretrained model through `lm.loading.load_model` (a GGUF file, a Hugging Face
  directory, an r1flow checkpoint directory, or a known name such as "smollm2-135m"), saved
  unchanged as this stage's checkpoint so later stages read one format.

Documents are length-bucketed, not packed, by default: each starts at position 0 with nothing
before it, exactly as a prompt does at sampling time (`packing = true` is there for corpora of
long documents). A held-out slice of the corpus gives the validation loss.

Outputs: `checkpoint/` (lm.checkpoint format with the tokenizer) and `metrics.parquet` (step, name,
value: loss, lr, grad_norm, tokens, tokens_per_s per step; val_loss every `eval_every` steps).
Resumes from `ctx.run_dir` after a crash with the same result as an uninterrupted run.

Budget (the shared 2-core AVX2 test machine, fp32): a "tiny" step of 32 documents (~2,080 tokens)
takes 0.37-0.58 s with both threads, so the default 600 steps take 4-6 minutes (221-349 s measured
across hours of this machine). On a CPU without native bf16 autocast is off: emulated bf16 made the
same stage over 3x slower than fp32 there (`lm.train.autocast_context`); with native bf16 it runs
under bf16 autocast. Validation loss (on the answer tokens after "Assistant:") at steps 200 / 400 /
600: 0.227 / 0.080 / 0.061 on the default corpus (run t1).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from artifacts.store import write_table
from lm.checkpoint import save_checkpoint
from lm.loading import load_model
from lm.model import MODEL_PRESETS
from lm.tokenizer import train_bpe
from lm.train import make_optimizer, resolve_device
from stages.context import StageContext
from stages.lm_training import (BatchPlan, Metrics, fixed_batches, lm_loss_sum, new_model, pack,
                                read_text_columns, split_holdout, start_or_resume, tokenize_documents, train_loop)
from stages.metrics import METRICS_SCHEMA

INPUTS: tuple[str, ...] = ("problems",)
SCHEMAS: dict[str, pa.Schema] = {"metrics.parquet": METRICS_SCHEMA}
SCRATCH = "scratch"


class Config(BaseModel):
    """Knobs of the base stage; defaults pretrain the tiny preset's model in a few CPU minutes."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(SCRATCH, description='"scratch" pretrains on the corpus; else a model to load '
                                             '(GGUF path, HF dir, r1flow checkpoint dir, "smollm2-135m")')
    # scratch mode
    model: str = Field("tiny", description="lm MODEL_PRESETS name")
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary cap (bytes + merges + special tokens)")
    bpe_docs: int = Field(5000, ge=1, description="corpus documents the BPE is trained on")
    seq_len: int = Field(160, ge=8, description="max tokens per document (or per packed window)")
    packing: bool = Field(False, description="pack documents into seq_len windows instead of bucketing")
    loss_after: str | None = Field(
        "Assistant:", description="loss only on what follows this marker in a document (the worked "
                                  "solution, not the randomly drawn question); None = every token")
    steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=1, description="documents (or windows) per micro-batch")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, description="3e-3 left the tiny model on a plateau: it never learned to "
                                                 "look up operand digits (greedy 1.5% vs 88% at 1e-3)")
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    clip: float = Field(1.0, ge=0, description="max global grad norm (0: no clipping)")
    autocast: bool = Field(True, description="bf16 autocast for forward/backward (fp32 master weights) where the device does bf16 natively")
    val_docs: int = Field(256, ge=0, description="held-out corpus documents for the validation loss")
    eval_every: int = Field(200, ge=1)
    checkpoint_every: int = Field(200, ge=1, description="resume-state interval in steps")
    log_every: int = Field(100, ge=1)

    @field_validator("model")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {v!r}; the presets are: {', '.join(MODEL_PRESETS)}")
        return v


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    """Pretrain (scratch) or load (any other source) the base model into `out/checkpoint`."""
    if cfg.source == SCRATCH:
        return _pretrain(cfg, inputs["problems"] / "corpus.parquet", out, ctx)
    return _load(cfg, out, ctx)


# ---- scratch: tokenizer + pretraining -----------------------------------------------------------


def _read_corpus(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(
            f"base.source='scratch' pretrains on the problems stage's corpus, but {path} does not exist: "
            "use the synthetic problems source with corpus_docs > 0, or set base.source to a pretrained "
            "model (a GGUF file, a Hugging Face directory, an r1flow checkpoint, or 'smollm2-135m')")
    return read_text_columns(path, ["text"], "base pretraining")["text"]


def _pretrain(cfg: Config, corpus_path: Path, out: Path, ctx: StageContext) -> dict[str, Any]:
    t0 = time.perf_counter()
    texts = _read_corpus(corpus_path)
    tok = train_bpe(texts[:cfg.bpe_docs], cfg.vocab_size)
    ctx.log(f"base: BPE trained on {min(len(texts), cfg.bpe_docs)} documents, vocabulary {tok.vocab_size}")

    max_len = min(cfg.seq_len, MODEL_PRESETS[cfg.model].max_seq_len)
    train_idx, val_idx = split_holdout(len(texts), 1.0, cfg.val_docs, ctx.seed)  # val_docs rows, never all
    docs, report = tokenize_documents(tok, [texts[i] for i in train_idx], None if cfg.packing else max_len,
                                      cfg.loss_after)
    val, _ = tokenize_documents(tok, [texts[i] for i in val_idx], max_len, cfg.loss_after)
    if cfg.packing:
        docs = pack(docs, max_len)
    if not docs:
        raise ValueError(f"{corpus_path}: no usable training documents ({report})")
    ctx.log(f"base: {len(docs)} training sequences, {len(val)} validation documents "
            f"({report.truncated} truncated to {max_len} tokens, {report.dropped_empty} empty dropped)")

    device = resolve_device(ctx.device)
    model = new_model(cfg.model, tok.vocab_size, ctx.seed).to(device).train()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    plan = BatchPlan([len(d) for d in docs], cfg.batch_size, ctx.seed)
    val_batches = fixed_batches(val, cfg.batch_size, tok.pad_id)
    state_dir, start, metrics = start_or_resume(ctx, "base", model, optimizer, cfg.steps, "base")

    loop_t0 = time.perf_counter()
    train_loop(model, optimizer, docs, plan, lm_loss_sum, cfg, steps=cfg.steps, start=start, metrics=metrics,
               pad_id=tok.pad_id, val_batches=val_batches, device=device, ctx=ctx, label="base",
               state_dir=state_dir, eval_every=cfg.eval_every)

    model.eval()
    final_loss = metrics.tail_mean("loss", max(1, min(50, cfg.steps // 10)))
    # the corpus writes its questions as the r1_zero_short prompt: `r1flow generate` renders with it
    meta = {"stage": "base", "source": SCRATCH, "preset": cfg.model, "steps": cfg.steps, "template": "r1_zero_short"}
    save_checkpoint(out / "checkpoint", model.float(), tok, meta)
    write_table(metrics.table(), out / "metrics.parquet", METRICS_SCHEMA)
    tokens_seen = int(sum(r["value"] for r in metrics.rows if r["name"] == "tokens"))
    return {
        "source": SCRATCH,
        "final_loss": final_loss,
        "val_loss": metrics.last("val_loss"),
        "params": model.num_params(),
        "vocab_size": tok.vocab_size,
        "steps": cfg.steps,
        "tokens_seen": tokens_seen,
        "train_sequences": len(docs),
        "truncated_docs": report.truncated,
        "seconds": round(time.perf_counter() - t0, 2),
        "train_seconds": round(time.perf_counter() - loop_t0, 2),
    }


# ---- any other source: load and re-save ---------------------------------------------------------


def _load(cfg: Config, out: Path, ctx: StageContext) -> dict[str, Any]:
    """Load a pretrained model with `lm.loading.load_model` and save it as an r1flow checkpoint.

    Kept in fp32 unless the run's dtype says otherwise (training stages downstream keep fp32
    master weights); the tokenizer travels with it.
    """
    t0 = time.perf_counter()
    model, tok = load_model(cfg.source, device="cpu", dtype=ctx.dtype)
    meta = {"stage": "base", "source": cfg.source}
    save_checkpoint(out / "checkpoint", model, tok, meta)
    write_table(Metrics().table(), out / "metrics.parquet", METRICS_SCHEMA)
    ctx.log(f"base: loaded {cfg.source} ({model.num_params():,} parameters)")
    return {"source": cfg.source, "final_loss": None, "params": model.num_params(),
            "vocab_size": tok.vocab_size, "tokens_seen": 0, "seconds": round(time.perf_counter() - t0, 2)}

