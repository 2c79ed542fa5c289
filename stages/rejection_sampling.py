"""The `rejection_sampling` stage: reasoning SFT data and preference pairs from the RL checkpoint.

Where from: DeepSeek-R1 (DeepSeek-AI 2025), sec. 2.3.3. When reasoning-oriented RL converges, R1
samples several responses per prompt from that checkpoint and "only retain[s] the correct ones",
after filtering out "chain-of-thought with mixed languages, long paragraphs, and code blocks";
the result (about 600k reasoning samples there) is the SFT data of the next round and of the
distilled students. Here:

1. N samples (`samples_per_prompt`) for each of a seeded subset of `max_prompts` train prompts
   from the rl_reasoning checkpoint;
2. the filter chain of `stages.filters` with every check on by default: correct, format,
   not cut off, no mixed language (consistency 1.0), no loop, no overlong paragraph, no code
   fence, then near-duplicate removal among a prompt's survivors;
3. at most `keep_per_prompt` (m) survivors per prompt -> ``reasoning_sft.parquet``.

It also writes ``preference_pairs.parquet`` (not in R1, which used no DPO: an extra for users who
want one): per prompt up to `pairs_per_prompt` pairs of a kept (so correct and clean) `chosen`
and a distinct incorrect `rejected` from the same prompt, rejected samples deduplicated like the
kept ones. And ``candidates.parquet``: every sample with its filter results and drop reason.

With `orm.enabled` (off by default) it also trains an outcome reward model on every candidate's
correctness label (`stages.orm`: a value head on a copy of the rl_reasoning checkpoint) and saves it
as ``orm/`` with its training curve ``orm_metrics.parquet``; `evaluate` then scores its samples
with it (ORM-weighted voting, ORM best-of-k).

Summary: kept, pairs, the drop counts per reason (they add up to the candidates), and the raw pass
rate per prompt (correct samples / N, before the readability filters): mean, median, min, max,
the share of prompts with no correct sample and with all samples correct.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from artifacts.store import write_table
from stages import filters
from stages import orm as orm_model
from stages.orm import OrmConfig
from stages.context import StageContext
from stages.metrics import METRICS_SCHEMA
from stages.sampling import (SamplerFactory, TemplateName, conversational, find_checkpoint, messages_type,
                             sample_train_rows)

INPUTS: tuple[str, ...] = ("rl_reasoning", "problems")

# `prompt`/`completion` (and `chosen`/`rejected`) are chat messages, TRL's conversational form, so
# SFTTrainer and DPOTrainer take the files as they are; the plain strings are the `*_text` columns.
REASONING_SFT_SCHEMA = pa.schema([
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("prompt", messages_type(), nullable=False),
    pa.field("completion", messages_type(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("completion_text", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("language", pa.string(), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
])
PREFERENCE_PAIRS_SCHEMA = pa.schema([
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("prompt", messages_type(), nullable=False),
    pa.field("chosen", messages_type(), nullable=False),
    pa.field("rejected", messages_type(), nullable=False),
    pa.field("prompt_text", pa.string(), nullable=False),
    pa.field("chosen_text", pa.string(), nullable=False),
    pa.field("rejected_text", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("chosen_sample", pa.int32(), nullable=False),
    pa.field("rejected_sample", pa.int32(), nullable=False),
])
SCHEMAS: dict[str, pa.Schema] = {
    "reasoning_sft.parquet": REASONING_SFT_SCHEMA,
    "preference_pairs.parquet": PREFERENCE_PAIRS_SCHEMA,
    "candidates.parquet": filters.CANDIDATES_SCHEMA,
    orm_model.METRICS_FILE: METRICS_SCHEMA,  # only with orm.enabled
}


class Config(filters.FilterSettings):
    """Knobs of the rejection_sampling stage (the filter chain's, every check on by default, in
    `filters.FilterSettings`); defaults suit the tiny preset."""

    template: TemplateName = "r1_zero_short"
    max_prompts: int | None = Field(None, ge=1, description="train prompts to sample (seeded subset); None = all")
    samples_per_prompt: int = Field(4, ge=1, description="N completions per prompt")
    pairs_per_prompt: int = Field(1, ge=0, description="preference pairs per prompt (0: none)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    stop_at_answer: bool = True
    batch_size: int = Field(256, ge=1, description="completions decoded at once (larger batches decode more tokens/s: 1.5x at 256 vs 64 on the tiny model)")
    seed_offset: int = 0
    orm: OrmConfig = Field(default_factory=OrmConfig, description="outcome reward model (off by default)")


def is_correct(row: dict[str, Any]) -> bool:
    """Accuracy reward 1 (None: no answer or unjudgeable, not correct)."""
    return row["accuracy"] is not None and row["accuracy"] >= 1.0


def preference_pairs(rows: list[dict[str, Any]], per_prompt: int, dedupe_threshold: float) -> list[dict[str, Any]]:
    """Pairs (chosen = a kept correct sample, rejected = an incorrect one) per prompt.

    Rejected samples are taken in sample order after near-duplicate removal, each used once; a
    prompt with no kept or no incorrect sample gives no pair.
    """
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_prompt.setdefault(r["problem_id"], []).append(r)
    pairs = []
    for pid, group in by_prompt.items():
        chosen = [r for r in group if r["drop_reason"] is None and is_correct(r)]
        wrong = [r for r in group if not is_correct(r)]
        dup = filters.duplicate_flags([r["completion"] for r in wrong], dedupe_threshold)
        wrong = [r for r, d in zip(wrong, dup) if not d]
        for c, w in list(zip(chosen, wrong))[:per_prompt]:
            pairs.append({"problem_id": pid, "prompt": c["prompt"], "chosen": c["completion"],
                          "rejected": w["completion"], "answer": c["answer"],
                          "chosen_sample": c["sample"], "rejected_sample": w["sample"]})
    return pairs


def pass_rate_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per-prompt raw pass rate (correct / samples, before the readability filters), summarised."""
    correct: dict[str, list[bool]] = {}
    for r in rows:
        correct.setdefault(r["problem_id"], []).append(is_correct(r))
    rates = np.array([np.mean(v) for v in correct.values()], dtype=np.float64)
    if rates.size == 0:
        return {"pass_rate_mean": 0.0, "pass_rate_median": 0.0, "pass_rate_min": 0.0, "pass_rate_max": 0.0,
                "share_no_correct": 0.0, "share_all_correct": 0.0}
    return {
        "pass_rate_mean": round(float(rates.mean()), 6),
        "pass_rate_median": round(float(np.median(rates)), 6),
        "pass_rate_min": round(float(rates.min()), 6),
        "pass_rate_max": round(float(rates.max()), 6),
        "share_no_correct": round(float((rates == 0).mean()), 6),
        "share_all_correct": round(float((rates == 1).mean()), 6),
    }


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext, *,
        sampler_factory: SamplerFactory | None = None) -> dict[str, Any]:
    """Write reasoning_sft.parquet, preference_pairs.parquet and candidates.parquet; return the summary.

    Args:
        sampler_factory: builds the Sampler from (model, tokenizer, batch_size); tests inject a
            scripted fake here. None: `ctx.sampler` (a server, `run.sampler`) or the local torch
            sampler (`stages.sampling.pick_sampler`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, n_prompts = sample_train_rows(cfg, inputs["rl_reasoning"], inputs["problems"], ctx, sampler_factory,
                                        stage="rejection_sampling", origin="rl_reasoning")
    kept, counts = filters.judge_rows(rows, cfg.filter_params(), "rejection_sampling")
    write_table(pa.Table.from_pylist(rows, schema=filters.CANDIDATES_SCHEMA), out / "candidates.parquet",
                filters.CANDIDATES_SCHEMA)

    sft_rows = [conversational(r, cfg.template, ("completion",)) for r in kept]
    write_table(pa.Table.from_pylist(sft_rows, schema=REASONING_SFT_SCHEMA), out / "reasoning_sft.parquet",
                REASONING_SFT_SCHEMA)
    pairs = preference_pairs(rows, cfg.pairs_per_prompt, cfg.dedupe_threshold)
    messages = {r["problem_id"]: r.get("messages") for r in rows}
    pair_rows = [conversational(dict(p, messages=messages.get(p["problem_id"])), cfg.template, ("chosen", "rejected"))
                 for p in pairs]
    write_table(pa.Table.from_pylist(pair_rows, schema=PREFERENCE_PAIRS_SCHEMA), out / "preference_pairs.parquet",
                PREFERENCE_PAIRS_SCHEMA)

    summary: dict[str, Any] = {
        **filters.kept_summary(rows, kept, n_prompts, counts),
        "pairs": len(pairs),
        **pass_rate_stats(rows),
    }
    if cfg.orm.enabled:
        metrics, orm_summary = orm_model.fit(cfg.orm, find_checkpoint(inputs["rl_reasoning"]),
                                       [r.get("messages") or r["prompt"] for r in rows],
                                       [r["completion"] for r in rows], [is_correct(r) for r in rows],
                                       [r["problem_id"] for r in rows], cfg.template, out / orm_model.DIR, ctx)
        write_table(metrics.table(), out / orm_model.METRICS_FILE, METRICS_SCHEMA)
        summary.update(orm_summary)
    ctx.log(f"rejection_sampling: kept {len(kept)} of {len(rows)} samples from {n_prompts} prompts, "
            f"{len(pairs)} pairs; pass rate {summary['pass_rate_mean']:.3f}, "
            f"no correct sample for {summary['share_no_correct']:.1%} of prompts")
    return summary
