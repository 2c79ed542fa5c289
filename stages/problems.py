"""The `problems` stage: the problem set every later stage trains and evaluates on.

Two sources (DESIGN.md stage table, issue 6):

- ``synthetic`` (the embedded default): problems from `stages.synthetic` with exact counts per
  split, plus ``corpus.parquet``, the deliberately noisy pretraining corpus the `base` stage
  pretrains the tiny model on. Corpus problems come from their own seed stream and never repeat a
  test question, so the test split stays held out of pretraining.
- ``file``: a user's Parquet, JSONL or CSV/TSV file with a column mapping
  (``--set problems.prompt_column=question``). No corpus is written for a user file.

Outputs:

- ``problems.parquet`` (always): ``id`` (first 16 hex digits of sha256 of the prompt, so the same
  question has the same id in every run), ``prompt`` (the bare question; stages apply the chat
  template), ``answer`` (normalised once: whitespace, a surrounding ``$…$``/``$$…$$`` and
  ``\\boxed{…}`` stripped), ``split`` (``train``/``test``), ``source`` (``synthetic/<task>`` or
  ``file/<file name>``), ``language``, ``difficulty`` (1..3 for synthetic, else from
  ``difficulty_column`` or null).
- ``corpus.parquet`` (optional: written only for the synthetic source with ``corpus_docs > 0``):
  ``text`` (``User: …\\nAssistant: …`` documents) and ``kind`` (clean / slip / untagged / drift).

The split is a deterministic function of the id: a user file without ``split_column`` puts a row in
the test split when ``hash("split:" + id)`` falls below ``test_fraction``; the synthetic source
takes the ``n_test`` problems with the smallest such hash, so its counts are exact.

Rows that cannot be used are dropped and counted, never silently kept or mangled: an empty prompt
or answer (after normalisation), a repeated prompt (the first occurrence wins; ``duplicate_conflicts``
counts repeats whose answer differs). Bytes that are not UTF-8 in a mapped column are an error
naming the file, the line (JSONL/CSV) or row (Parquet) and the column, unless
``on_invalid_utf8="skip"``, which drops such rows and counts them in ``skipped_invalid_utf8``.
A missing mapped column is an error naming it and listing the columns the file has.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from artifacts.store import write_table
from stages import synthetic
from stages.context import StageContext

INPUTS: tuple[str, ...] = ()

PROBLEMS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("language", pa.string(), nullable=False),
    pa.field("difficulty", pa.int32(), nullable=True),
])
CORPUS_SCHEMA = pa.schema([
    pa.field("text", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
])
# corpus.parquet is optional: present only for the synthetic source (see the module docstring).
SCHEMAS: dict[str, pa.Schema] = {"problems.parquet": PROBLEMS_SCHEMA, "corpus.parquet": CORPUS_SCHEMA}

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
    "validation": "test", "valid": "test", "val": "test", "dev": "test",
}
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".csv": "csv", ".tsv": "tsv"}


class Config(BaseModel):
    """Knobs of the problems stage; defaults build the tiny preset's synthetic set."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["synthetic", "file"] = "synthetic"

    # synthetic source
    n_train: int = Field(2000, ge=0, description="synthetic train problems")
    n_test: int = Field(200, ge=0, description="synthetic test problems")
    task_mix: dict[str, float] = Field(default_factory=lambda: dict(synthetic.DEFAULT_TASK_MIX))
    difficulty_mix: dict[int, float] = Field(default_factory=lambda: dict(synthetic.DEFAULT_DIFFICULTY_MIX))
    seed_offset: int = Field(0, description="added to the run seed for this stage's generators")
    corpus_docs: int = Field(20000, ge=0, description="pretraining documents; 0 writes no corpus")
    slip_rate: float = Field(0.25, ge=0, le=1)
    untagged_rate: float = Field(0.25, ge=0, le=1)
    drift_rate: float = Field(0.15, ge=0, le=1)

    # file source
    path: str | None = None
    file_format: Literal["auto", "parquet", "jsonl", "csv", "tsv"] = "auto"
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    split_column: str | None = None
    language_column: str | None = None
    difficulty_column: str | None = None
    default_language: str = "en"
    test_fraction: float = Field(0.1, ge=0, le=1, description="file source without split_column")
    on_invalid_utf8: Literal["error", "skip"] = "error"

    @field_validator("task_mix")
    @classmethod
    def _known_tasks(cls, v: dict[str, float]) -> dict[str, float]:
        synthetic.check_mix(v, synthetic.TASKS, "task")
        return v

    @field_validator("difficulty_mix")
    @classmethod
    def _known_levels(cls, v: dict[int, float]) -> dict[int, float]:
        synthetic.check_mix(v, synthetic.DIFFICULTIES, "difficulty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        self.corpus_config()  # rates sum to at most 1
        if self.source == "file" and not self.path:
            raise ValueError("source='file' needs path (the user's Parquet/JSONL/CSV file)")
        return self

    def corpus_config(self) -> synthetic.CorpusConfig:
        return synthetic.CorpusConfig(self.slip_rate, self.untagged_rate, self.drift_rate)


# ------------------------------------------------------------------------------------ normalising


def problem_id(prompt: str) -> str:
    """Stable id of a problem: the first 16 hex digits of sha256(prompt)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def split_key(pid: str) -> float:
    """A uniform number in [0, 1) fixed by the id: the deterministic train/test assignment."""
    return int(hashlib.sha256(f"split:{pid}".encode()).hexdigest()[:15], 16) / 16**15


def _strip_boxed(s: str) -> str | None:
    r"""The inside of '\boxed{...}' when the braces wrap the whole string, else None."""
    if not (s.startswith("\\boxed{") and s.endswith("}")):
        return None
    depth = 0
    for i, ch in enumerate(s[len("\\boxed"):], start=len("\\boxed")):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:  # the opening brace closed here: it must be the last character
            return s[len("\\boxed{"):-1] if i == len(s) - 1 else None
    return None


def normalize_answer(text: str) -> str:
    r"""Strip whitespace and wrappers around a reference answer: '$\boxed{ 5 }$ ' -> '5'.

    Only wrappers enclosing the whole answer go ('$5 and $6' stays, '\boxed{1}+\boxed{2}' stays).
    """
    s = text.strip()
    while True:
        before = s
        if len(s) >= 4 and s.startswith("$$") and s.endswith("$$"):
            s = s[2:-2].strip()
        elif len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s[1:-1].strip()
        inner = _strip_boxed(s)
        if inner is not None:
            s = inner.strip()
        if s == before:
            return s


# ----------------------------------------------------------------------------------- user files

_BAD_TEXT = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or lone surrogates


@dataclass
class _RawRow:
    where: str  # "line 3" / "row 3", for messages
    values: dict[str, Any]


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in _FORMATS:
        return _FORMATS[path.suffix.lower()]
    raise ValueError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                     f"set problems.file_format to one of parquet, jsonl, csv, tsv")


def _read_parquet(path: Path, columns: list[str]) -> tuple[list[str], list[_RawRow]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    available = table.column_names
    _require_columns(path, columns, available)
    data: dict[str, list[Any]] = {}
    for name in columns:
        col = table.column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            # Read strings as bytes and decode ourselves: a foreign writer may have stored invalid
            # UTF-8, and this reports it per row instead of failing the whole column.
            col = col.cast(pa.large_binary())
        values = col.to_pylist()
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            values = [None if v is None else v.decode("utf-8", "surrogateescape") for v in values]
        data[name] = values
    rows = [_RawRow(f"row {i + 1}", {c: data[c][i] for c in columns}) for i in range(table.num_rows)]
    return available, rows


def _read_jsonl(path: Path, columns: list[str]) -> tuple[list[str], list[_RawRow]]:
    rows: list[_RawRow] = []
    keys: dict[str, None] = {}
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSONL
        text = line.decode("utf-8", "surrogateescape")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        keys.update(dict.fromkeys(obj))
        rows.append(_RawRow(f"line {lineno}", {c: obj.get(c) for c in columns}))
    available = list(keys)
    _require_columns(path, columns, available)
    return available, rows


def _read_delimited(path: Path, columns: list[str], delimiter: str) -> tuple[list[str], list[_RawRow]]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    reader = csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path}: empty file, expected a header row") from None
    for name in header:
        if _BAD_TEXT.search(name):
            raise ValueError(f"{path} line 1: the header has bytes that are not UTF-8 ({_bad_bytes(name)})")
    _require_columns(path, columns, header)
    index = {c: header.index(c) for c in columns}
    rows = []
    for record in reader:
        if not record:
            continue  # a blank line
        values = {c: (record[i] if i < len(record) else None) for c, i in index.items()}
        rows.append(_RawRow(f"line {reader.line_num}", values))
    return header, rows


def _require_columns(path: Path, columns: list[str], available: list[str]) -> None:
    missing = [c for c in columns if c not in available]
    if missing:
        which = ", ".join(repr(c) for c in missing)
        raise ValueError(
            f"{path}: column {which} not found; the file has columns: {', '.join(map(repr, available)) or '(none)'}. "
            "Map yours with problems.prompt_column / answer_column / split_column / language_column / "
            "difficulty_column.")


def _bad_bytes(text: str) -> str:
    chars = _BAD_TEXT.findall(text)[:4]
    return " ".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"U+{ord(c):04X}" for c in chars)


def _as_text(value: Any, path: Path, where: str, column: str) -> str:
    """A cell as text: numbers become their decimal form (5.0 -> '5'); containers are an error.

    NaN and infinities (JSON's NaN/Infinity, a float column's missing values) are no value at all:
    empty, like null, so their rows are dropped and counted, never kept as the answer "nan".
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    raise ValueError(f"{path} {where}: column {column!r} holds a {type(value).__name__}; expected text or a number")


def _read_user_file(cfg: Config) -> tuple[Path, list[dict[str, Any]], Counter]:
    """Read and map the user's rows: {prompt, answer, split, language, difficulty, where}."""
    path = Path(cfg.path or "")
    if not path.is_file():
        raise FileNotFoundError(f"problems file {path} does not exist (problems.path)")
    fmt = _detect_format(path, cfg.file_format)
    mapping = {"prompt": cfg.prompt_column, "answer": cfg.answer_column, "split": cfg.split_column,
               "language": cfg.language_column, "difficulty": cfg.difficulty_column}
    mapping = {k: v for k, v in mapping.items() if v}
    columns = list(dict.fromkeys(mapping.values()))
    if fmt == "parquet":
        _, raw_rows = _read_parquet(path, columns)
    elif fmt == "jsonl":
        _, raw_rows = _read_jsonl(path, columns)
    else:
        _, raw_rows = _read_delimited(path, columns, "," if fmt == "csv" else "\t")
    counts: Counter = Counter()
    rows = []
    for raw in raw_rows:
        texts = {field: _as_text(raw.values[col], path, raw.where, col) for field, col in mapping.items()}
        bad = [(mapping[f], t) for f, t in texts.items() if _BAD_TEXT.search(t)]
        if bad:
            if cfg.on_invalid_utf8 == "skip":
                counts["skipped_invalid_utf8"] += 1
                continue
            col, text = bad[0]
            raise ValueError(
                f"{path} {raw.where}: column {col!r} has bytes that are not valid UTF-8 ({_bad_bytes(text)}); "
                "re-encode the file as UTF-8, or set problems.on_invalid_utf8='skip' to drop such rows "
                "(they are counted in the summary)")
        texts["where"] = raw.where
        rows.append(texts)
    return path, rows, counts


def _split_of(text: str, path: Path, where: str) -> str:
    split = _SPLIT_ALIASES.get(text.strip().lower())
    if split is None:
        raise ValueError(f"{path} {where}: split value {text!r} is not train or test "
                         f"(accepted: {', '.join(sorted(_SPLIT_ALIASES))})")
    return split


def _difficulty_of(text: str, path: Path, where: str) -> int | None:
    if not text.strip():
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{path} {where}: difficulty {text!r} is not an integer") from None


def _file_problems(cfg: Config) -> tuple[list[dict[str, Any]], Counter]:
    path, rows, counts = _read_user_file(cfg)
    source = f"file/{path.name}"
    seen: dict[str, str] = {}
    out = []
    for r in rows:
        prompt, answer = r["prompt"].strip(), normalize_answer(r["answer"])
        if not prompt:
            counts["dropped_empty_prompt"] += 1
            continue
        if not answer:
            counts["dropped_empty_answer"] += 1
            continue
        pid = problem_id(prompt)
        if pid in seen:
            counts["dropped_duplicate"] += 1
            counts["duplicate_conflicts"] += seen[pid] != answer
            continue
        counts["answers_normalised"] += answer != r["answer"]  # among kept rows
        seen[pid] = answer
        if "split" in r:
            split = _split_of(r["split"], path, r["where"])
        else:
            split = "test" if split_key(pid) < cfg.test_fraction else "train"
        out.append({
            "id": pid, "prompt": prompt, "answer": answer, "split": split, "source": source,
            "language": r.get("language", "").strip() or cfg.default_language,
            "difficulty": _difficulty_of(r["difficulty"], path, r["where"]) if "difficulty" in r else None,
        })
    return out, counts


# ------------------------------------------------------------------------------------ synthetic


def _stream_seed(seed: int, stream: str) -> int:
    """Independent, reproducible seeds for the stage's random streams."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "big")


def _synthetic_problems(cfg: Config, seed: int) -> list[dict[str, Any]]:
    problems = synthetic.generate_problems(
        cfg.n_train + cfg.n_test, _stream_seed(seed, "problems"), cfg.task_mix, cfg.difficulty_mix)
    ids = [problem_id(p.question) for p in problems]
    test_ids = set(sorted(ids, key=split_key)[:cfg.n_test])
    return [{
        "id": pid, "prompt": p.question, "answer": normalize_answer(p.answer),
        "split": "test" if pid in test_ids else "train", "source": f"synthetic/{p.task}",
        "language": synthetic.TARGET_LANGUAGE, "difficulty": p.difficulty,
    } for pid, p in zip(ids, problems)]


def _write_corpus(cfg: Config, seed: int, test_prompts: set[str], out: Path) -> dict[str, Any]:
    problems = synthetic.generate_problems(
        cfg.corpus_docs, _stream_seed(seed, "corpus-problems"), cfg.task_mix, cfg.difficulty_mix,
        exclude=frozenset(test_prompts), unique=False)
    docs = synthetic.build_corpus(problems, cfg.corpus_config(), _stream_seed(seed, "corpus-noise"))
    table = pa.table({"text": [d.text for d in docs], "kind": [d.kind for d in docs]}, schema=CORPUS_SCHEMA)
    write_table(table, out / "corpus.parquet", CORPUS_SCHEMA)
    kinds = Counter(d.kind for d in docs)
    chars = [len(d.text) for d in docs]
    summary: dict[str, Any] = {"corpus_docs": len(docs)}
    summary.update({f"corpus_{k}": kinds.get(k, 0) for k in synthetic.KINDS})
    summary["corpus_mean_chars"] = round(sum(chars) / max(len(chars), 1), 1)
    summary["corpus_max_chars"] = max(chars, default=0)
    return summary


# ------------------------------------------------------------------------------------------ run


def source_fingerprint(cfg: Config) -> str | None:
    """sha256 of the user file's bytes (None for the synthetic source).

    The stage has no upstream artifacts, so its cache key sees only the config, i.e. the file's
    path; an orchestrator should fold this into the key so an edited file is not served stale.
    """
    if cfg.source != "file":
        return None
    path = Path(cfg.path or "")
    if not path.is_file():
        raise FileNotFoundError(f"problems file {path} does not exist (problems.path)")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    """Build problems.parquet (and corpus.parquet for the synthetic source) in `out`.

    Returns a flat summary: row counts per split, dropped/skipped counts per reason, rows per
    source, and for the synthetic source the corpus size, noise counts and document lengths.
    """
    out = Path(out)
    seed = ctx.seed + cfg.seed_offset
    counts: Counter = Counter()
    if cfg.source == "synthetic":
        rows = _synthetic_problems(cfg, seed)
    else:
        rows, counts = _file_problems(cfg)
    table = pa.Table.from_pylist(rows, schema=PROBLEMS_SCHEMA)
    write_table(table, out / "problems.parquet", PROBLEMS_SCHEMA)

    splits = Counter(r["split"] for r in rows)
    summary: dict[str, Any] = {
        "source": cfg.source,
        "rows": len(rows),
        "rows_train": splits.get("train", 0),
        "rows_test": splits.get("test", 0),
    }
    for reason in ("dropped_empty_prompt", "dropped_empty_answer", "dropped_duplicate",
                   "duplicate_conflicts", "skipped_invalid_utf8", "answers_normalised"):
        summary[reason] = counts.get(reason, 0)
    if cfg.source == "file":
        summary["file_sha256"] = source_fingerprint(cfg)
    if cfg.source == "synthetic":
        for src, n in sorted(Counter(r["source"] for r in rows).items()):
            summary[f"rows_task_{src.removeprefix('synthetic/')}"] = n
    dropped = sum(summary[k] for k in ("dropped_empty_prompt", "dropped_empty_answer",
                                       "dropped_duplicate", "skipped_invalid_utf8"))
    if dropped:
        ctx.log(f"problems: dropped {dropped} rows (empty prompt {summary['dropped_empty_prompt']}, "
                f"empty answer {summary['dropped_empty_answer']}, duplicate {summary['dropped_duplicate']}, "
                f"invalid UTF-8 {summary['skipped_invalid_utf8']})")
    if cfg.source == "synthetic" and cfg.corpus_docs > 0:
        test_prompts = {r["prompt"] for r in rows if r["split"] == "test"}
        summary.update(_write_corpus(cfg, seed, test_prompts, out))
    ctx.log(f"problems: {summary['rows_train']} train, {summary['rows_test']} test"
            + (f", corpus {summary['corpus_docs']} docs" if "corpus_docs" in summary else ""))
    return summary
