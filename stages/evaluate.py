"""The `evaluate` stage: every checkpoint of the run on the held-out test split.

Where from: DeepSeek-R1 (DeepSeek-AI 2025), sec. 3 "Evaluation setup": greedy decoding gives
high repetition rates and variance on long-CoT models, so R1 samples k responses per question at
temperature 0.6, top-p 0.95 and reports pass@1 = (1/k) sum_i p_i, plus cons@64 (majority vote).
Here, per checkpoint (base, rl_zero, sft, rl_reasoning, dpo when that stage is enabled, then every
student and baseline found in distill's ``students/<name>/`` and ``baselines/<name>/``):

- pass@1: mean correctness of k samples (temperature / top-p from the config);
- maj@k: the majority answer of the k samples is correct (ties: the answer seen first;
  `stages.metrics`); answers vote by value, so "0.5" and "1/2" agree;
- pass@k: Chen et al.'s unbiased estimator with n = k (then simply "any sample correct");
- format_rate: share of samples whose format reward is 1;
- language_mix_rate: share of samples whose think text is not all in the target language:
  rewards.language_consistency_reward < 1 on a judgeable think body, one with at least
  `language_min_words` words (default 1, so a single foreign-script word counts, as the metric's
  definition says; the RL reward judges from 5 words so as not to pay for verbosity, set 5 to
  measure exactly what it rewards). A body with no words to judge is not mixed;
- mean_length: mean generated tokens per sample;
- greedy_accuracy: one greedy (temperature 0) completion per problem (null when `greedy=false`);
- params: the model's parameter count;
- inference-time scaling (Wu et al. 2024): for k = 1, 2, 4, ... K, maj@k, weighted majority vote
  (a vote weighs exp of the sample's length-normalised log-probability), best-of-k by that
  log-probability, and pass@k, each with the generated tokens per problem it costs (k × mean
  length): `scaling.parquet`, and `weighted_maj@k` / `best_of_k` (k = K) in the summary
  (`stages.metrics.scaling_curve`);
- with an outcome reward model (`rejection_sampling.orm.enabled`, `stages.orm`): every sample's
  ORM probability of being correct (`orm_score` in eval.parquet), the vote weight of
  `orm_weighted_maj@k` and the score of `orm_best_of_k` (null without an ORM), and the two ORM
  curves in `scaling.parquet` (methods orm_weighted_maj, orm_best_of).

All rates are fractions in [0, 1]. Every checkpoint sees the same problems and the same sampling
seeds (common random numbers: differences between checkpoints are not seed noise). The test
problems are an evenly spaced subset of `max_problems` of the split, so they do not depend on the
run seed either.

Outputs: ``eval.parquet`` (one row per sample, greedy rows flagged), ``summary.parquet`` (one row
per checkpoint), ``scaling.parquet`` (checkpoint, k, method, accuracy, tokens_per_problem), and the
manifest summary CONTRACTS.md fixes:
``{"<ckpt>": {"pass@1", "maj@k", "pass@k", "k", "format_rate", "language_mix_rate", "mean_length",
"greedy_accuracy", "params", "weighted_maj@k", "best_of_k", "orm_weighted_maj@k", "orm_best_of_k"}, ...,
"best_pass@1": x}``.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from artifacts.store import write_table
from lm.chat_template import prefills_think
from rewards import accuracy_reward, format_reward, language_consistency_reward
from rewards.extract import answer_region, canonical, final_answer_candidates
from rewards.numbers import parse_plain_number
from stages import metrics, orm
from stages.context import StageContext
from stages.filters import is_language_mixed
from stages.sampling import (
    Problem, SamplerFactory, TemplateName, check_prompt_lengths, encode_prompts, find_checkpoint, load_policy,
    read_problems, sample_completions, sampling_params, stage_seed, pick_sampler,
)

INPUTS: tuple[str, ...] = ("problems", "base", "rl_zero", "sft", "rl_reasoning", "rejection_sampling", "dpo",
                           "distill")  # rejection_sampling: its ORM, when it trained one
MODEL_STAGES: tuple[str, ...] = ("base", "rl_zero", "sft", "rl_reasoning")
OPTIONAL_MODEL_STAGES: tuple[str, ...] = ("dpo",)  # evaluated when their artifact holds a checkpoint

EVAL_SCHEMA = pa.schema([
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("greedy", pa.bool_(), nullable=False),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("predicted", pa.string()),  # the answer as it votes in maj@k (null: none extracted)
    pa.field("correct", pa.bool_(), nullable=False),
    pa.field("format_ok", pa.bool_(), nullable=False),
    pa.field("language_mixed", pa.bool_(), nullable=False),
    pa.field("language_consistency", pa.float64()),
    pa.field("length", pa.int32(), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("logprob_mean", pa.float64()),  # length-normalised log-prob (null: the sampler gave none)
    pa.field("orm_score", pa.float64()),  # the ORM's P(correct) (null: the run has no ORM)
])
SUMMARY_SCHEMA = pa.schema([
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("pass_at_1", pa.float64(), nullable=False),
    pa.field("maj_at_k", pa.float64(), nullable=False),
    pa.field("pass_at_k", pa.float64(), nullable=False),
    pa.field("k", pa.int32(), nullable=False),
    pa.field("format_rate", pa.float64(), nullable=False),
    pa.field("language_mix_rate", pa.float64(), nullable=False),
    pa.field("mean_length", pa.float64(), nullable=False),
    pa.field("greedy_accuracy", pa.float64()),
    pa.field("params", pa.int64(), nullable=False),
    pa.field("problems", pa.int32(), nullable=False),
    pa.field("weighted_maj_at_k", pa.float64()),
    pa.field("best_of_k", pa.float64()),
    pa.field("orm_weighted_maj_at_k", pa.float64()),
    pa.field("orm_best_of_k", pa.float64()),
])
SCALING_SCHEMA = pa.schema([
    pa.field("checkpoint", pa.string(), nullable=False),
    pa.field("k", pa.int32(), nullable=False),
    pa.field("method", pa.string(), nullable=False),  # maj | weighted_maj | best_of | pass | orm_*
    pa.field("accuracy", pa.float64(), nullable=False),
    pa.field("tokens_per_problem", pa.float64(), nullable=False),
])
# summary first: `r1flow inspect RUN/evaluate` opens the stage's first dataset (the checkpoint table)
SCHEMAS: dict[str, pa.Schema] = {"summary.parquet": SUMMARY_SCHEMA, "eval.parquet": EVAL_SCHEMA,
                                 "scaling.parquet": SCALING_SCHEMA}


class Config(BaseModel):
    """Knobs of the evaluate stage; defaults suit the tiny preset (R1's 0.6 / 0.95 sampling)."""

    model_config = ConfigDict(extra="forbid")

    template: TemplateName = "r1_zero_short"
    max_problems: int | None = Field(200, ge=1, description="test problems (evenly spaced subset); None = all")
    k: int = Field(4, ge=1, description="samples per problem for pass@1, maj@k, pass@k")
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    greedy: bool = Field(True, description="also one greedy completion per problem (greedy_accuracy)")
    max_new_tokens: int = Field(128, ge=1)
    stop_at_answer: bool = True
    batch_size: int = Field(256, ge=1, description="completions decoded at once (larger batches decode more tokens/s: 1.5x at 256 vs 64 on the tiny model)")
    language_min_words: int = Field(1, ge=1, description="words a think body needs to be judged for mixing")
    checkpoints: list[str] | None = Field(
        None, description="evaluate only these (e.g. ['base', 'student:tiny-student']); None = all found")
    seed_offset: int = 0


@dataclass(frozen=True)
class CheckpointRef:
    name: str  # base | rl_zero | sft | rl_reasoning | dpo | student:<name> | baseline:<name>
    path: Path


def find_checkpoints(inputs: dict[str, Path]) -> list[CheckpointRef]:
    """The run's checkpoints in recipe order: the four model stages, dpo if it wrote a checkpoint,
    then distill's students and baselines (sorted by name). A stage missing from `inputs` is skipped."""
    refs = [CheckpointRef(s, find_checkpoint(inputs[s])) for s in MODEL_STAGES if s in inputs]
    refs += [CheckpointRef(s, Path(inputs[s]) / "checkpoint") for s in OPTIONAL_MODEL_STAGES
             if s in inputs and (Path(inputs[s]) / "checkpoint").is_dir()]
    if "distill" in inputs:
        for kind, folder in (("student", "students"), ("baseline", "baselines")):
            base = Path(inputs["distill"]) / folder
            if base.is_dir():
                refs += [CheckpointRef(f"{kind}:{d.name}", find_checkpoint(d))
                         for d in sorted(base.iterdir()) if d.is_dir()]
    return refs


def evenly_spaced(n_total: int, max_n: int | None) -> list[int]:
    """max_n indices spread evenly over range(n_total) (all when None or larger)."""
    if max_n is None or max_n >= n_total:
        return list(range(n_total))
    return sorted({int(i) for i in np.linspace(0, n_total - 1, max_n).round()})


def answer_key(completion: str) -> str | None:
    """The completion's final answer as it votes in maj@k: its exact value when it is a plain
    number ("0.50" and "1/2" -> "1/2"), else its canonical spelling; None when it has none."""
    region = answer_region(completion)
    if region is None:
        return None
    cands = final_answer_candidates(region)
    if not cands:
        return None
    if len(cands) == 1:
        num = parse_plain_number(cands[0])
        if num is not None:
            value = num.value / 100 if num.percent else num.value
            return str(Fraction(value))
    key = ", ".join(canonical(c) for c in cands)
    return key or None


def grade(completions: list[str], problems: list[Problem], language_min_words: int = 1,
          think_prefilled: bool = False) -> dict[str, list]:
    """Per-completion correctness, format, language mix and answer key, via the rewards package
    (`think_prefilled`: the prompts opened `<think>`, template "chat_think")."""
    answers = [p.answer for p in problems]
    languages = [p.language for p in problems]
    acc = accuracy_reward(completions, answer=answers)
    fmt = format_reward(completions, think_prefilled=think_prefilled)
    lang = language_consistency_reward(completions, language=languages, min_words=language_min_words)
    return {
        "correct": [a is not None and a >= 1.0 for a in acc],
        "format_ok": [f is not None and f >= 1.0 for f in fmt],
        "language_consistency": list(lang),
        "language_mixed": [is_language_mixed(c) for c in lang],
        "predicted": [answer_key(c) for c in completions],
    }


def _groups(sampled: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for r in sampled:
        by_problem.setdefault(r["problem_id"], []).append(r)
    return [sorted(g, key=lambda r: r["sample"]) for g in by_problem.values()]


def _has_orm(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(r.get("orm_score") is not None for r in rows)


def scaling_rows(name: str, sampled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`scaling.parquet` rows of one checkpoint: each method at k = 1, 2, 4, ... K (a sample without
    a log-prob scores 0, i.e. votes with weight 1), and the ORM's two when samples have ORM scores."""
    groups = _groups(sampled)
    curve = metrics.scaling_curve([([r["predicted"] for r in g],
                                    [r["logprob_mean"] if r["logprob_mean"] is not None else 0.0 for r in g],
                                    [r["correct"] for r in g]) for g in groups])
    methods = [(row, m, m) for row in curve for m in ("maj", "weighted_maj", "best_of", "pass")]
    if _has_orm(sampled):
        orm_curve = metrics.scaling_curve([([r["predicted"] for r in g], [r["orm_score"] for r in g],
                                            [r["correct"] for r in g]) for g in groups], weight=float)
        methods += [(row, m, f"orm_{m}") for row in orm_curve for m in ("weighted_maj", "best_of")]
    mean_len = float(np.mean([r["length"] for r in sampled]))
    return [{"checkpoint": name, "k": row["k"], "method": label, "accuracy": row[m],
             "tokens_per_problem": row["k"] * mean_len} for row, m, label in methods]


def orm_metrics(groups: list[list[dict[str, Any]]], k: int) -> dict[str, float | None]:
    """ORM-weighted maj@k (a vote weighs the sample's ORM probability) and ORM best-of-k, averaged
    over problems; None when the samples carry no ORM score."""
    if not _has_orm([r for g in groups for r in g]):
        return {"orm_weighted_maj@k": None, "orm_best_of_k": None}
    answers = [[r["predicted"] for r in g] for g in groups]
    scores = [[r["orm_score"] for r in g] for g in groups]
    correct = [[r["correct"] for r in g] for g in groups]
    return {
        "orm_weighted_maj@k": float(np.mean([metrics.weighted_maj_at_k(a, s, c, k)
                                             for a, s, c in zip(answers, scores, correct)])),
        "orm_best_of_k": float(np.mean([metrics.best_of_k(s, c, k) for s, c in zip(scores, correct)])),
    }


def checkpoint_metrics(sampled: list[dict[str, Any]], greedy: list[dict[str, Any]], k: int,
                       params: int) -> dict[str, Any]:
    """The manifest's per-checkpoint metrics from its eval rows (see the module docstring)."""
    groups = _groups(sampled)
    weights = [[float(np.exp(r["logprob_mean"])) if r["logprob_mean"] is not None else 1.0 for r in g] for g in groups]
    scores = [[r["logprob_mean"] if r["logprob_mean"] is not None else 0.0 for r in g] for g in groups]
    return {
        "pass@1": float(np.mean([metrics.pass_at_1([r["correct"] for r in g]) for g in groups])),
        "maj@k": float(np.mean([metrics.maj_at_k([r["predicted"] for r in g], [r["correct"] for r in g], k)
                                for g in groups])),
        "pass@k": metrics.mean_pass_at_k([(len(g), sum(r["correct"] for r in g)) for g in groups], k),
        "k": k,
        "format_rate": float(np.mean([r["format_ok"] for r in sampled])),
        "language_mix_rate": float(np.mean([r["language_mixed"] for r in sampled])),
        "mean_length": float(np.mean([r["length"] for r in sampled])),
        "greedy_accuracy": float(np.mean([r["correct"] for r in greedy])) if greedy else None,
        "params": int(params),
        "weighted_maj@k": float(np.mean([metrics.weighted_maj_at_k([r["predicted"] for r in g], w,
                                                                   [r["correct"] for r in g], k)
                                         for g, w in zip(groups, weights)])),
        "best_of_k": float(np.mean([metrics.best_of_k(s, [r["correct"] for r in g], k)
                                    for g, s in zip(groups, scores)])),
        **orm_metrics(groups, k),
    }


def _evaluate_one(ref: CheckpointRef, problems: list[Problem], cfg: Config, ctx: StageContext, seed: int,
                  sampler_factory: SamplerFactory,
                  scorer: orm.OutcomeRewardModel | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model, tok = load_policy(ref.path, ctx.device, ctx.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    ids = encode_prompts(tok, [p.question for p in problems], cfg.template)
    check_prompt_lengths(ids, cfg.max_new_tokens, model.config.max_seq_len, [p.id for p in problems])
    sampler = sampler_factory(model, tok, cfg.batch_size)
    runs = [(False, cfg.k, cfg.temperature, cfg.top_p)] + ([(True, 1, 0.0, 1.0)] if cfg.greedy else [])
    rows: list[dict[str, Any]] = []
    for is_greedy, n, temperature, top_p in runs:
        params = sampling_params(tok, max_new_tokens=cfg.max_new_tokens, temperature=temperature, top_p=top_p,
                                 stop_at_answer=cfg.stop_at_answer)
        samples = sample_completions(sampler, tok, ids, n=n, params=params, batch_size=cfg.batch_size,
                                     seed=seed, progress=ctx.progress,
                                     desc=f"evaluate {ref.name}{' greedy' if is_greedy else ''}")
        flat = [(p, c) for p, per in zip(problems, samples) for c in per]
        graded = grade([c.text for _, c in flat], [p for p, _ in flat], cfg.language_min_words,
                       prefills_think(cfg.template))
        graded["orm_score"] = (scorer.probabilities([p.question for p, _ in flat], [c.text for _, c in flat])
                               if scorer is not None else [None] * len(flat))
        for i, (p, c) in enumerate(flat):
            rows.append({"checkpoint": ref.name, "problem_id": p.id, "sample": c.sample, "greedy": is_greedy,
                         "completion": c.text, "length": c.n_tokens, "finish_reason": c.finish_reason,
                         "logprob_mean": c.logprob_mean,
                         **{key: values[i] for key, values in graded.items()}})
    del sampler, model
    gc.collect()
    sampled = [r for r in rows if not r["greedy"]]
    greedy = [r for r in rows if r["greedy"]]
    return rows, checkpoint_metrics(sampled, greedy, cfg.k, n_params)


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext, *,
        sampler_factory: SamplerFactory | None = None) -> dict[str, Any]:
    """Evaluate every checkpoint; write eval.parquet and summary.parquet; return the manifest summary.

    Args:
        sampler_factory: builds the Sampler from (model, tokenizer, batch_size); tests inject a
            scripted fake here. None: `ctx.sampler` (a server, `run.sampler`) or the local torch
            sampler (`stages.sampling.pick_sampler`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test = read_problems(inputs["problems"], "test")
    problems = [test[i] for i in evenly_spaced(len(test), cfg.max_problems)]
    refs = find_checkpoints(inputs)
    if cfg.checkpoints is not None:
        unknown = sorted(set(cfg.checkpoints) - {r.name for r in refs})
        if unknown:
            raise ValueError(f"evaluate.checkpoints names {unknown}, not in this run; "
                             f"found: {', '.join(r.name for r in refs)}")
        refs = [r for r in refs if r.name in cfg.checkpoints]
    if not refs:
        raise ValueError("evaluate found no checkpoint to evaluate")
    if sampler_factory is None and getattr(ctx, "sampler", None) is not None and len(refs) != 1:
        # A server holds one model: scoring every checkpoint with it would label one model's
        # numbers with several checkpoints' names.
        raise ValueError(f"run.sampler sends sampling to a server holding one model, but evaluate would score "
                         f"{len(refs)} checkpoints ({', '.join(r.name for r in refs)}) with it: set "
                         f"evaluate.checkpoints = [\"<the one the server holds>\"]")
    sampler_factory = pick_sampler(sampler_factory, ctx)
    seed = stage_seed(ctx.seed + cfg.seed_offset, "evaluate")
    scorer = orm.find(inputs.get("rejection_sampling"), ctx.device)
    ctx.log(f"evaluate: {len(refs)} checkpoints x {len(problems)} test problems x {cfg.k} samples"
            + (" + greedy" if cfg.greedy else "") + (", ORM-scored" if scorer is not None else ""))

    all_rows: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for ref in refs:
        rows, m = _evaluate_one(ref, problems, cfg, ctx, seed, sampler_factory, scorer)
        all_rows += rows
        scaling += scaling_rows(ref.name, [r for r in rows if not r["greedy"]])
        summary[ref.name] = {key: (round(v, 6) if isinstance(v, float) else v) for key, v in m.items()}
        ctx.log(f"evaluate: {ref.name}: pass@1 {m['pass@1']:.3f}, maj@{cfg.k} {m['maj@k']:.3f}, "
                f"format {m['format_rate']:.3f}, language mix {m['language_mix_rate']:.3f}")
    write_table(pa.Table.from_pylist(all_rows, schema=EVAL_SCHEMA), out / "eval.parquet", EVAL_SCHEMA)
    table_rows = [{"checkpoint": name, "pass_at_1": m["pass@1"], "maj_at_k": m["maj@k"], "pass_at_k": m["pass@k"],
                   "k": m["k"], "format_rate": m["format_rate"], "language_mix_rate": m["language_mix_rate"],
                   "mean_length": m["mean_length"], "greedy_accuracy": m["greedy_accuracy"], "params": m["params"],
                   "problems": len(problems), "weighted_maj_at_k": m["weighted_maj@k"], "best_of_k": m["best_of_k"],
                   "orm_weighted_maj_at_k": m["orm_weighted_maj@k"], "orm_best_of_k": m["orm_best_of_k"]}
                  for name, m in summary.items()]
    write_table(pa.Table.from_pylist(table_rows, schema=SUMMARY_SCHEMA), out / "summary.parquet", SUMMARY_SCHEMA)
    write_table(pa.Table.from_pylist(scaling, schema=SCALING_SCHEMA), out / "scaling.parquet", SCALING_SCHEMA)
    summary["best_pass@1"] = max(m["pass@1"] for m in summary.values())
    return summary
