"""The `cold_start` stage: a small set of readable long-CoT traces to fine-tune the base model on.

Where from: DeepSeek-R1 (DeepSeek-AI 2025), sec. 2.3.1. R1 collected thousands of cold-start
examples, among other ways by "gathering DeepSeek-R1-Zero outputs in a readable format, and
refining the results through post-processing by human annotators", because R1-Zero's raw outputs
mix languages and lack a readable layout. Here the post-processing is automatic:

1. k samples per train prompt from the rl_zero checkpoint (a seeded subset of `max_prompts`
   prompts), at the temperature of the config;
2. the filter chain of `stages.filters`: correct, format-valid, cut-off/length bounds,
   language-consistent at or above a threshold, no repetition loop (the `checks` field);
3. at most `keep_per_prompt` survivors per prompt, in sample order;
4. optionally (`rewrite="readable"`) the survivors are rewritten into R1's readable pattern, the
   reasoning and then a summary, and re-verified (a rewrite that would break correctness or
   format is not applied, and counted).

Instead of sampling, `source="file"` reads a user-supplied cold-start file (Parquet or JSONL with
`prompt` and `completion`; optional `answer`, `language`, `problem_id`). A row without an answer
column takes the answer of the problem with the same prompt, when there is one; checks whose input
is missing are recorded as not applied (null). Rows with an empty prompt or completion are dropped
and counted (`dropped_empty`); an unreadable, non-UTF-8, empty or column-less file is an error.

Outputs: `cold_start.parquet` (the kept rows: what `sft` trains on) and `candidates.parquet`
(every candidate with its filter results and `drop_reason`, for `r1flow inspect`). The summary
counts candidates dropped per reason; the counts add up: candidates = kept + sum(dropped_*).
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from artifacts.store import write_table
from lm.checkpoint import load_tokenizer
from lm.tokenizer import Tokenizer
from rewards import accuracy_reward, format_reward
from stages import filters
from stages.context import StageContext
from stages.lm_training import encode_text
from stages.problems import problem_id
from stages.sampling import (SamplerFactory, TemplateName, conversational, find_checkpoint, messages_type, read_problems,
                             sample_train_rows)

INPUTS: tuple[str, ...] = ("rl_zero", "problems")

# `prompt`/`completion` are chat messages, TRL's conversational form (SFTTrainer takes the file as
# it is); the plain strings are `prompt_text`/`completion_text`, which `sft` trains on.
COLD_START_SCHEMA = pa.schema([
    pa.field("prompt", messages_type(), nullable=False),
    pa.field("completion", messages_type(), nullable=False),
    *[pa.field(f"{f.name}_text", f.type, f.nullable) if f.name in ("prompt", "completion") else f
      for f in filters.CANDIDATE_FIELDS],
    pa.field("rewritten", pa.bool_(), nullable=False),
    pa.field("original_completion", pa.string()),  # the sampled text when `completion` was rewritten
])
SCHEMAS: dict[str, pa.Schema] = {"cold_start.parquet": COLD_START_SCHEMA,
                                  "candidates.parquet": filters.CANDIDATES_SCHEMA}

DEFAULT_CHECKS = ["correct", "format", "length", "language", "repetition"]


class Config(filters.FilterSettings):
    """Knobs of the cold_start stage (the filter chain's in `filters.FilterSettings`); defaults suit
    the tiny preset."""

    source: Literal["sample", "file"] = "sample"
    path: str | None = Field(None, description="user cold-start file (Parquet/JSONL: prompt, completion)")
    filter_file: bool = Field(True, description="run the filter chain over a user file's rows too")

    template: TemplateName = "r1_zero_short"
    max_prompts: int | None = Field(256, ge=1, description="train prompts to sample (seeded subset); None = all")
    samples_per_prompt: int = Field(4, ge=1, description="k completions per prompt")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    stop_at_answer: bool = True
    batch_size: int = Field(256, ge=1, description="completions decoded at once (larger batches decode more tokens/s: 1.5x at 256 vs 64 on the tiny model)")

    checks: list[str] = Field(default_factory=lambda: list(DEFAULT_CHECKS))

    rewrite: Literal["none", "readable"] = "none"
    seed_offset: int = 0

    @model_validator(mode="after")
    def _file_needs_path(self) -> "Config":
        if self.source == "file" and not self.path:
            raise ValueError("source='file' needs path (a Parquet/JSONL file with prompt and completion)")
        return self


# ------------------------------------------------------------------------------------ candidates


def read_user_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a user cold-start file: Parquet or JSONL with `prompt` and `completion` columns.

    Raises ValueError naming the file (and the line or row) when it is missing, empty, not
    UTF-8, not JSON/Parquet, or lacks a required column; the message lists the columns it has.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cold-start file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"cold-start file {path} is empty")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows, columns = _read_jsonl(path)
    elif suffix in (".parquet", ".pq"):
        rows, columns = _read_parquet(path)
    else:
        raise ValueError(f"cold-start file {path}: unsupported extension {path.suffix!r}; use .parquet or .jsonl")
    if not rows:
        raise ValueError(f"cold-start file {path} has no rows")
    missing = [c for c in ("prompt", "completion") if c not in columns]
    if missing:
        raise ValueError(f"cold-start file {path}: missing column(s) {missing}; "
                         f"it has: {', '.join(map(repr, columns)) or '(none)'}")
    return rows


_OPTIONAL = ("problem_id", "answer", "language")


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, columns = [], {}
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"cold-start file {path} line {lineno}: not UTF-8 (byte {line[e.start]:#04x} "
                             f"at column {e.start + 1})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"cold-start file {path} line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"cold-start file {path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        columns.update(dict.fromkeys(obj))
        rows.append({"where": f"line {lineno}", **{k: obj.get(k) for k in ("prompt", "completion", *_OPTIONAL)}})
    return rows, list(columns)


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"cold-start file {path}: not a readable Parquet file ({e})") from None
    data: dict[str, list[Any]] = {}
    for name in ("prompt", "completion", *_OPTIONAL):
        if name not in table.column_names:
            continue
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
                or pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            raise ValueError(f"cold-start file {path}: column {name!r} has type {col.type}, expected text")
        # Decode ourselves: a foreign writer may have stored bytes that are not UTF-8.
        values = col.cast(pa.large_binary()).to_pylist()
        decoded = []
        for i, v in enumerate(values):
            try:
                decoded.append(None if v is None else v.decode("utf-8"))
            except UnicodeDecodeError:
                raise ValueError(f"cold-start file {path} row {i + 1}: column {name!r} is not UTF-8") from None
        data[name] = decoded
    rows = [{"where": f"row {i + 1}", **{k: data[k][i] if k in data else None
                                         for k in ("prompt", "completion", *_OPTIONAL)}}
            for i in range(table.num_rows)]
    return rows, table.column_names


def _file_rows(cfg: Config, inputs: dict[str, Path]) -> tuple[list[dict[str, Any]], int, int]:
    """The user file as candidate rows (answers looked up by prompt when absent); also the number
    of distinct prompts and of rows dropped as empty."""
    raw = read_user_file(Path(cfg.path or ""))
    for r in raw:
        for k in ("prompt", "completion", *_OPTIONAL):
            if r[k] is not None and not isinstance(r[k], str):
                raise ValueError(f"cold-start file {cfg.path} {r['where']}: {k!r} must be text, "
                                 f"got {type(r[k]).__name__}")
    known = {p.prompt.strip(): p for split in ("train", "test") for p in _split_or_empty(inputs["problems"], split)}
    tok = load_tokenizer(find_checkpoint(inputs["rl_zero"]))
    rows, empty = [], 0
    per_prompt: Counter[str] = Counter()
    for r in raw:
        prompt, completion = (r["prompt"] or "").strip(), r["completion"] or ""
        if not prompt or not completion.strip():
            empty += 1
            continue
        match = known.get(prompt)
        pid = r["problem_id"] or (match.id if match else problem_id(prompt))
        rows.append({"problem_id": pid, "prompt": prompt, "completion": completion,
                     "answer": r["answer"] if r["answer"] is not None else (match.answer if match else None),
                     "language": r["language"] or (match.language if match else None),
                     "sample": per_prompt[pid], "n_tokens": len(encode_text(tok, completion)),
                     "finish_reason": "stop", "origin": "file"})
        per_prompt[pid] += 1
    if not rows:
        raise ValueError(f"cold-start file {cfg.path}: every row has an empty prompt or completion")
    return rows, len(per_prompt), empty


def _split_or_empty(problems_dir: Path, split: str) -> list:
    try:
        return read_problems(problems_dir, split)
    except ValueError:
        return []


# ------------------------------------------------------------------------------------- rewrite


def readable(completion: str) -> str | None:
    """R1's readable pattern (sec. 2.3.1, "reasoning process, then summary") in this project's
    tags: ` <think> {reasoning} </think> <answer> {answer} </answer>`, with the reasoning's
    whitespace collapsed, anything outside the tags removed, and the reasoning ending in a summary
    sentence that states the answer ("so {answer}." when it does not already).

    Returns None when the completion lacks a think body or an answer.
    """
    start, end = completion.find("<think>"), completion.find("</think>")
    a_start, a_end = completion.rfind("<answer>"), completion.rfind("</answer>")
    if start < 0 or end < start or a_start < end or a_end < a_start:
        return None
    reasoning = " ".join(completion[start + len("<think>"):end].split())
    answer = " ".join(completion[a_start + len("<answer>"):a_end].split())
    if not reasoning or not answer:
        return None
    last = reasoning.rstrip(".").rsplit(". ", 1)[-1]
    if answer not in last:
        reasoning = f"{reasoning.rstrip('.')}. so {answer}."
    elif not reasoning.endswith("."):
        reasoning += "."
    return f" <think> {reasoning} </think> <answer> {answer} </answer>"


def _rewrite(rows: list[dict[str, Any]], think_prefilled: bool = False) -> tuple[int, int]:
    """Rewrite kept rows in place when the readable form still passes accuracy and format.
    Returns (rewritten, rewrite_rejected)."""
    todo = [(r, readable(r["completion"])) for r in rows]
    todo = [(r, new) for r, new in todo if new is not None and new != r["completion"]]
    if not todo:
        return 0, 0
    texts = [new for _, new in todo]
    fmt = format_reward(texts, think_prefilled=think_prefilled)
    acc = accuracy_reward(texts, answer=[r["answer"] for r, _ in todo])
    done = 0
    for (r, new), f, a in zip(todo, fmt, acc):
        old_ok_acc = r["pass_correct"] is not True or (a is not None and a >= 1.0)
        old_ok_fmt = r["pass_format"] is not True or (f is not None and f >= 1.0)
        if old_ok_acc and old_ok_fmt:
            r["original_completion"], r["completion"], r["rewritten"] = r["completion"], new, True
            done += 1
    return done, len(todo) - done


# ------------------------------------------------------------------------------------------ run


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext, *,
        sampler_factory: SamplerFactory | None = None) -> dict[str, Any]:
    """Build cold_start.parquet and candidates.parquet in `out`; return the flat summary.

    Args:
        sampler_factory: builds the Sampler from (model, tokenizer, batch_size); tests inject a
            scripted fake here. None: `ctx.sampler` (a server, `run.sampler`) or the local torch
            sampler (`stages.sampling.pick_sampler`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    empty = 0
    if cfg.source == "file":
        rows, n_prompts, empty = _file_rows(cfg, inputs)
        # a user's rows are whole completions whatever the template: none starts inside <think>
        params = (dataclasses.replace(cfg.filter_params(), think_prefilled=False) if cfg.filter_file
                  else filters.FilterParams(checks=()))
    else:
        rows, n_prompts = sample_train_rows(cfg, inputs["rl_zero"], inputs["problems"], ctx, sampler_factory,
                                            stage="cold_start", origin="rl_zero")
        params = cfg.filter_params()
    kept, counts = filters.judge_rows(rows, params, "cold_start")
    write_table(pa.Table.from_pylist(rows, schema=filters.CANDIDATES_SCHEMA), out / "candidates.parquet", filters.CANDIDATES_SCHEMA)

    kept = [dict(r, rewritten=False, original_completion=None) for r in kept]
    rewritten, rewrite_rejected = _rewrite(kept, params.think_prefilled) if cfg.rewrite == "readable" else (0, 0)
    trl_rows = [conversational(r, cfg.template, ("completion",)) for r in kept]
    write_table(pa.Table.from_pylist(trl_rows, schema=COLD_START_SCHEMA), out / "cold_start.parquet", COLD_START_SCHEMA)

    summary: dict[str, Any] = {
        "source": cfg.source,
        **filters.kept_summary(rows, kept, n_prompts, counts),
        "dropped_empty": empty,  # file rows skipped before filtering (not candidates)
        "rewritten": rewritten,
        "rewrite_rejected": rewrite_rejected,
    }
    ctx.log(f"cold_start: kept {len(kept)} of {len(rows)} candidates from {n_prompts} prompts; dropped "
            + ", ".join(f"{r} {n}" for r, n in counts.items() if n))
    if not kept:
        ctx.log("cold_start: WARNING no candidate passed every filter; sft will have nothing to train on")
    return summary
