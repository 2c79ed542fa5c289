"""The `problems` stage: the problem set every later stage trains and evaluates on.

Two sources (DESIGN.md stage table, issue 6):

- ``synthetic`` (the embedded default): problems from `stages.synthetic` with exact counts per
  split, plus ``corpus.parquet``, the deliberately noisy pretraining corpus the `base` stage
  pretrains the tiny model on. Corpus problems come from their own seed stream and never repeat a
  test question, so the test split stays held out of pretraining.
- ``file``: the user's Parquet, JSONL or CSV/TSV data: ``path`` is a file, a directory of shards or
  a glob (``data/train-*.parquet``); a file named by its split (``train*``, ``test*``,
  ``validation*``) puts its rows in that split. ``schema`` says how a row holds its problem:

  - ``columns``: a prompt and an answer column by name (``prompt_column``/``answer_column``);
  - ``verl``: verl's RL Parquet (``examples/data_preprocess/gsm8k.py``): ``data_source``, ``prompt``
    (chat messages), ``ability``, ``reward_model.ground_truth`` (the answer), ``extra_info``;
  - ``trl``: ``prompt`` as text or as chat messages (TRL's conversational form), the answer in
    ``answer_column`` (``answer``, else ``solution`` (its last box) or ``ground_truth``);
  - ``openr1``: ``problem`` + ``answer``, or + ``solution`` whose last ``\\boxed{}`` (or GSM8K's
    ``#### 42``) is the answer;
  - ``auto`` (the default): verl with a ``reward_model`` column, open-r1 with ``problem``, the
    column mapping when ``prompt_column``/``answer_column`` are set, else trl.

  Column names may be dotted paths into struct columns (``reward_model.ground_truth``). A chat
  prompt keeps its messages (``messages``; ``prompt`` is its last user turn) and stages render
  them with their template; ``data_source`` and ``extra_info`` are kept and reach the rewards.
  The pretraining corpus is then built from the train problems (see ``_write_user_corpus``).

Outputs:

- ``problems.parquet`` (always): ``id`` (first 16 hex digits of sha256 of the prompt, so the same
  question has the same id in every run), ``prompt`` (the bare question; stages apply the chat
  template), ``answer`` (normalised once: whitespace, a surrounding ``$…$``/``$$…$$`` and
  ``\\boxed{…}`` stripped), ``split`` (``train``/``test``), ``source`` (``synthetic/<task>`` or
  ``file/<file name>``), ``language``, ``difficulty`` (0..3 for synthetic, else from
  ``difficulty_column`` or null), ``messages`` (a chat prompt's turns, with ``system_prompt`` and the
  ``few_shot`` examples when set; null otherwise).
- ``corpus.parquet`` (optional: written only with ``corpus_docs > 0``; for a user file, R1-format
  documents of its train problems):
  ``text`` (``User: …\\nAssistant: …`` documents) and ``kind`` (clean / slip / untagged / drift).

The split is a deterministic function of the id: a user file without ``split_column`` puts a row in
the test split when ``hash("split:" + id)`` falls below ``test_fraction``; the synthetic source
takes the ``n_test`` problems with the smallest such hash, so its counts are exact.

Rows that cannot be used are dropped and counted, never silently kept or mangled: an empty prompt
or answer (after normalisation), no answer found (``dropped_no_answer``), a message list that is
not role/content dicts ending with a user turn (``dropped_bad_messages``), a repeated prompt (the first occurrence wins; ``duplicate_conflicts``
counts repeats whose answer differs). Bytes that are not UTF-8 in a mapped column are an error
naming the file, the line (JSONL/CSV) or row (Parquet) and the column, unless
``on_invalid_utf8="skip"``, which drops such rows and counts them in ``skipped_invalid_utf8``.
A missing mapped column is an error naming it and listing the columns the file has.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

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
    # From chat-message files (verl, TRL conversational): the prompt's messages (``prompt`` is then
    # its last user turn), verl's ``data_source`` and ``extra_info`` (as JSON text); null otherwise.
    pa.field("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])), nullable=True),
    pa.field("data_source", pa.string(), nullable=True),
    pa.field("extra_info", pa.string(), nullable=True),
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


# `schema` names the file layout (the user-facing key); pydantic warns that it shadows the
# deprecated `BaseModel.schema()` classmethod, which nothing here calls.
warnings.filterwarnings("ignore", message='Field name "schema" in "Config" shadows', category=UserWarning)


class FewShot(BaseModel):
    """One worked example shown before every prompt: a user turn and the assistant's answer."""

    model_config = ConfigDict(extra="forbid")

    user: str = Field(min_length=1)
    assistant: str = Field(min_length=1)


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
    path: str | None = Field(None, description="a file, a directory of shards, or a glob (data/train-*.parquet)")
    schema: Literal["auto", "columns", "verl", "trl", "openr1"] = Field(
        "auto", description="how the files lay out prompt and answer (auto: from the columns)")
    file_format: Literal["auto", "parquet", "jsonl", "csv", "tsv"] = "auto"
    prompt_column: str | None = Field(None, description="default per schema: prompt (open-r1: problem)")
    answer_column: str | None = Field(None, description="default per schema: answer (trl: answer, solution or "
                                      "ground_truth; verl: reward_model.ground_truth; open-r1: answer or solution)")
    split_column: str | None = None
    language_column: str | None = None
    difficulty_column: str | None = None
    default_language: str = "en"
    test_fraction: float = Field(0.1, ge=0, le=1, description="file source without split_column")
    on_invalid_utf8: Literal["error", "skip"] = "error"

    # either source, stored in `messages` so every stage renders the same prompt: a system turn for
    # prompts without one (None: the stage's template brings R1-Zero's instruction), and worked
    # examples put before the question as earlier user/assistant turns (after the system turn)
    system_prompt: str | None = Field(None, min_length=1)
    few_shot: list[FewShot] = Field(default_factory=list)

    @field_validator("task_mix")
    @classmethod
    def _known_tasks(cls, v: dict[str, float]) -> dict[str, float]:
        synthetic.check_mix(v, synthetic.TASKS, "task")
        return v

    @field_validator("difficulty_mix")
    @classmethod
    def _known_levels(cls, v: dict[int, float]) -> dict[int, float]:
        synthetic.check_mix(v, synthetic.LEVELS, "difficulty")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        self.corpus_config()  # rates sum to at most 1
        if self.source == "synthetic":
            synthetic.check_easy_level([t for t, w in self.task_mix.items() if w > 0],
                                       [d for d, w in self.difficulty_mix.items() if w > 0])
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
_SPLIT_FILE = re.compile(r"(train|training|test|testing|validation|valid|val|dev|eval|evaluation)(?![a-z])")
_GSM8K_ANSWER = re.compile(r"####\s*([^\n]+?)\s*$", re.M)


@dataclass
class _RawRow:
    where: str  # "line 3" / "row 3", for messages
    values: dict[str, Any]
    file: Path | None = None
    file_split: str | None = None  # from the file name (train*.parquet, test-0000.parquet, ...)


def resolve_paths(path: str) -> list[Path]:
    """The data files `problems.path` names: a file, a directory of shards (its files with a
    known extension, sorted, recursively) or a glob (``data/train-*.parquet``, ``**`` allowed)."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _FORMATS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise FileNotFoundError(f"problems directory {p} holds no data files "
                                    f"({', '.join(sorted(_FORMATS))}) (problems.path)")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"problems.path {path!r} matches no file")
        return files
    raise FileNotFoundError(f"problems file {p} does not exist (problems.path)")


def split_of_file(path: Path) -> str | None:
    """train/test from a file's name (``train.parquet``, ``test-00000-of-00001.parquet``,
    ``validation.jsonl``); None when the name does not say."""
    m = _SPLIT_FILE.match(path.name.lower())
    return _SPLIT_ALIASES.get(m.group(1)) if m else None


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in _FORMATS:
        return _FORMATS[path.suffix.lower()]
    raise ValueError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                     f"set problems.file_format to one of parquet, jsonl, csv, tsv")


def _read_parquet(path: Path) -> tuple[list[str], list[_RawRow]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from e
    data: dict[str, list[Any]] = {}
    for name in table.column_names:
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
    names = table.column_names
    rows = [_RawRow(f"row {i + 1}", {c: data[c][i] for c in names}) for i in range(table.num_rows)]
    return names, rows


def _read_jsonl(path: Path) -> tuple[list[str], list[_RawRow]]:
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
        rows.append(_RawRow(f"line {lineno}", obj))
    return list(keys), rows


def _read_delimited(path: Path, delimiter: str) -> tuple[list[str], list[_RawRow]]:
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
    rows = []
    for record in reader:
        if not record:
            continue  # a blank line
        values = {c: (record[i] if i < len(record) else None) for i, c in enumerate(header)}
        rows.append(_RawRow(f"line {reader.line_num}", values))
    return header, rows


def _require_columns(path: Path, columns: list[str], available: list[str]) -> None:
    missing = [c for c in columns if c not in available and c.split(".")[0] not in available]
    if missing:
        which = ", ".join(repr(c) for c in missing)
        raise ValueError(
            f"{path}: column {which} not found; the file has columns: {', '.join(map(repr, available)) or '(none)'}. "
            "Map yours with problems.prompt_column / answer_column / split_column / language_column / "
            "difficulty_column (dotted paths reach into structs: reward_model.ground_truth), or set "
            "problems.schema to verl, trl or openr1.")


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


def lookup(values: dict[str, Any], column: str) -> Any:
    """A row's value for `column`; a dotted path reaches into structs (``reward_model.ground_truth``)
    when no column has the dotted name itself. Missing -> None."""
    if column in values:
        return values[column]
    head, *rest = column.split(".")
    value = values.get(head)
    for key in rest:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _read_files(cfg: Config) -> tuple[list[Path], list[str], list[_RawRow]]:
    """Every row of every file `problems.path` names, with the columns the files have."""
    paths = resolve_paths(cfg.path or "")
    columns: dict[str, None] = {}
    rows: list[_RawRow] = []
    for path in paths:
        fmt = _detect_format(path, cfg.file_format)
        if fmt == "parquet":
            names, file_rows = _read_parquet(path)
        elif fmt == "jsonl":
            names, file_rows = _read_jsonl(path)
        else:
            names, file_rows = _read_delimited(path, "," if fmt == "csv" else "\t")
        columns.update(dict.fromkeys(names))
        split = split_of_file(path)
        for r in file_rows:
            r.file, r.file_split = path, split
        rows.extend(file_rows)
    return paths, list(columns), rows


# ---------------------------------------------------------------------------------- file schemas
# Each schema maps a raw row to {prompt, messages, answer, data_source, extra_info} (None where a
# schema has no such field) or to the reason it cannot be used (a string: counted, then dropped).

SCHEMA_NAMES = ("auto", "columns", "verl", "trl", "openr1")
_ANSWER_FALLBACKS = ("answer", "solution", "ground_truth")


class _BadRow(Exception):
    """A row that cannot be used; the message is the drop reason (a summary key)."""


def detect_schema(cfg: Config, columns: list[str]) -> str:
    """`auto`: verl when a `reward_model` column exists, open-r1 when `problem` does (and the
    prompt column does not), else trl; a prompt/answer column set in the config means `columns`
    unless the files are verl/open-r1 shaped."""
    if cfg.schema != "auto":
        return cfg.schema
    if "reward_model" in columns and _prompt(cfg) in columns:
        return "verl"
    if "problem" in columns and _prompt(cfg) not in columns:
        return "openr1"
    if cfg.prompt_column is not None or cfg.answer_column is not None:
        return "columns"
    return "trl"


def _prompt(cfg: Config, default: str = "prompt") -> str:
    return cfg.prompt_column or default


def messages_of(value: Any) -> list[dict[str, str]]:
    """A chat-message list checked: role/content dicts with string values (None: not a list)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise _BadRow("dropped_bad_messages")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _BadRow("dropped_bad_messages")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise _BadRow("dropped_bad_messages")
    return out


def _prompt_and_messages(value: Any, raw: _RawRow, column: str) -> tuple[str, list[dict[str, str]] | None]:
    if isinstance(value, (list, tuple)):
        messages = messages_of(value)
        return messages[-1]["content"], messages
    if isinstance(value, dict):
        raise _BadRow("dropped_bad_messages")
    return _as_text(value, raw.file or Path("?"), raw.where, column), None


def answer_from_solution(solution: str) -> str | None:
    r"""The answer in a worked solution: its last ``\boxed{}``, else GSM8K's ``#### 42``."""
    from rewards.extract import boxed_contents

    boxes = boxed_contents(solution)
    if boxes:
        return boxes[-1]
    m = list(_GSM8K_ANSWER.finditer(solution))
    return m[-1].group(1).replace(",", "") if m else None


def _answer_text(value: Any, raw: _RawRow, column: str, *, worked: bool) -> str:
    if value is None:
        raise _BadRow("dropped_no_answer")
    text = _as_text(value, raw.file or Path("?"), raw.where, column)
    if worked:
        found = answer_from_solution(text)
        if found is None:
            raise _BadRow("dropped_no_answer")
        return found
    return text


def _map_columns(cfg: Config, raw: _RawRow) -> dict[str, Any]:
    p, a = _prompt(cfg), cfg.answer_column or "answer"
    prompt = _as_text(lookup(raw.values, p), raw.file or Path("?"), raw.where, p)
    answer = _as_text(lookup(raw.values, a), raw.file or Path("?"), raw.where, a)
    return {"prompt": prompt, "messages": None, "answer": answer}


def _map_trl(cfg: Config, raw: _RawRow) -> dict[str, Any]:
    prompt, messages = _prompt_and_messages(lookup(raw.values, _prompt(cfg)), raw, _prompt(cfg))
    names = [cfg.answer_column] if cfg.answer_column else list(_ANSWER_FALLBACKS)
    for name in names:
        value = lookup(raw.values, name)
        if value is not None:
            return {"prompt": prompt, "messages": messages, "worked": _worked(raw),
                    "answer": _answer_text(value, raw, name, worked=name == "solution")}
    raise _BadRow("dropped_no_answer")


def _worked(raw: _RawRow) -> str | None:
    """A row's worked solution (open-r1's and TRL math sets' `solution`), for the corpus."""
    value = raw.values.get("solution")
    return value if isinstance(value, str) and value.strip() else None


def _map_verl(cfg: Config, raw: _RawRow) -> dict[str, Any]:
    prompt, messages = _prompt_and_messages(lookup(raw.values, _prompt(cfg)), raw, _prompt(cfg))
    column = cfg.answer_column or "reward_model.ground_truth"
    return {"prompt": prompt, "messages": messages,
            "answer": _answer_text(lookup(raw.values, column), raw, column, worked=False)}


def _map_openr1(cfg: Config, raw: _RawRow) -> dict[str, Any]:
    column = _prompt(cfg, "problem")
    prompt, messages = _prompt_and_messages(lookup(raw.values, column), raw, column)
    if cfg.answer_column:
        return {"prompt": prompt, "messages": messages, "worked": _worked(raw),
                "answer": _answer_text(lookup(raw.values, cfg.answer_column), raw, cfg.answer_column, worked=False)}
    answer = lookup(raw.values, "answer")
    if answer is not None and _as_text(answer, raw.file or Path("?"), raw.where, "answer").strip():
        return {"prompt": prompt, "messages": messages, "worked": _worked(raw),
                "answer": _answer_text(answer, raw, "answer", worked=False)}
    return {"prompt": prompt, "messages": messages, "worked": _worked(raw),
            "answer": _answer_text(lookup(raw.values, "solution"), raw, "solution", worked=True)}


_SCHEMAS: dict[str, Callable[[Config, _RawRow], dict[str, Any]]] = {
    "columns": _map_columns, "trl": _map_trl, "verl": _map_verl, "openr1": _map_openr1}
# Columns each schema needs in the files (a clear error names a missing one).
_REQUIRED: dict[str, Callable[[Config], list[str]]] = {
    "columns": lambda c: [_prompt(c), c.answer_column or "answer"],
    "trl": lambda c: [_prompt(c)] + ([c.answer_column] if c.answer_column else []),
    "verl": lambda c: [_prompt(c), c.answer_column or "reward_model"],
    "openr1": lambda c: [_prompt(c, "problem")],
}


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _texts_of(mapped: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, text) pairs to check for undecodable bytes."""
    out = [("prompt", mapped["prompt"]), ("answer", mapped["answer"])]
    out += [("prompt", m["content"]) for m in mapped.get("messages") or []]
    return out


def _read_user_rows(cfg: Config) -> tuple[list[Path], str, list[dict[str, Any]], Counter]:
    """Read and map the user's rows: {prompt, messages, answer, split, language, difficulty,
    data_source, extra_info, file, where}; bad rows are dropped and counted by reason."""
    paths, columns, raw_rows = _read_files(cfg)
    schema = detect_schema(cfg, columns)
    optional = [c for c in (cfg.split_column, cfg.language_column, cfg.difficulty_column) if c]
    _require_columns(paths[0] if len(paths) == 1 else Path(cfg.path or ""), _REQUIRED[schema](cfg) + optional, columns)
    mapper = _SCHEMAS[schema]
    names = {"prompt": _prompt(cfg, "problem" if schema == "openr1" else "prompt"),
             "answer": cfg.answer_column or "answer", "split": cfg.split_column,
             "language": cfg.language_column, "difficulty": cfg.difficulty_column}
    counts: Counter = Counter()
    rows = []
    for raw in raw_rows:
        path = raw.file or Path("?")
        try:
            mapped = mapper(cfg, raw)
        except _BadRow as e:
            counts[str(e)] += 1
            continue
        for field in ("split", "language", "difficulty"):
            column = names[field]
            if column:
                mapped[field] = _as_text(lookup(raw.values, column), path, raw.where, column)
        texts = _texts_of(mapped) + [(f, mapped[f]) for f in ("split", "language", "difficulty") if f in mapped]
        bad = [(names.get(f) or f, t) for f, t in texts if _BAD_TEXT.search(t)]
        if bad:
            if cfg.on_invalid_utf8 == "skip":
                counts["skipped_invalid_utf8"] += 1
                continue
            col, text = bad[0]
            raise ValueError(
                f"{path} {raw.where}: column {col!r} has bytes that are not valid UTF-8 ({_bad_bytes(text)}); "
                "re-encode the file as UTF-8, or set problems.on_invalid_utf8='skip' to drop such rows "
                "(they are counted in the summary)")
        data_source = lookup(raw.values, "data_source")
        mapped["data_source"] = None if data_source is None else _as_text(data_source, path, raw.where, "data_source")
        mapped["extra_info"] = _json_text(lookup(raw.values, "extra_info"))
        if "split" not in mapped and raw.file_split is not None:
            mapped["file_split"] = raw.file_split
        mapped["where"], mapped["file"] = raw.where, path
        rows.append(mapped)
    return paths, schema, rows, counts


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


def _id_of(prompt: str, messages: list[dict[str, str]] | None) -> str:
    """A single user turn has the id of its text; a longer conversation the id of all its turns."""
    if messages and len(messages) > 1:
        return problem_id(json.dumps(messages, ensure_ascii=False, sort_keys=True))
    return problem_id(prompt)


def _file_problems(cfg: Config) -> tuple[list[dict[str, Any]], Counter, str]:
    paths, schema, rows, counts = _read_user_rows(cfg)
    seen: dict[str, str] = {}
    out = []
    for r in rows:
        path = r["file"]
        prompt, answer = r["prompt"].strip(), normalize_answer(r["answer"])
        if not prompt:
            counts["dropped_empty_prompt"] += 1
            continue
        if not answer:
            counts["dropped_empty_answer"] += 1
            continue
        pid = _id_of(prompt, r["messages"])
        if pid in seen:
            counts["dropped_duplicate"] += 1
            counts["duplicate_conflicts"] += seen[pid] != answer
            continue
        counts["answers_normalised"] += answer != r["answer"]  # among kept rows
        seen[pid] = answer
        if "split" in r:
            split = _split_of(r["split"], path, r["where"])
        elif "file_split" in r:
            split = r["file_split"]
        else:
            split = "test" if split_key(pid) < cfg.test_fraction else "train"
        out.append({
            "id": pid, "prompt": prompt, "answer": answer, "split": split, "source": f"file/{path.name}",
            "language": r.get("language", "").strip() or cfg.default_language,
            "difficulty": _difficulty_of(r["difficulty"], path, r["where"]) if "difficulty" in r else None,
            "messages": r["messages"], "data_source": r["data_source"], "extra_info": r["extra_info"],
            "worked": r.get("worked"),
        })
    if not out:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v and k.startswith(("dropped", "skipped")))
        raise ValueError(f"problems.path {cfg.path!r} ({schema} schema): no usable row"
                         + (f" ({reasons})" if reasons else " (the files are empty)"))
    return out, counts, schema


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


def _write_user_corpus(cfg: Config, train: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """A pretraining corpus from the user's train problems, for a `base` stage that pretrains from
    scratch (the embedded tiny model): one R1-format document per problem, its worked solution
    (when the file has one) as the reasoning, cycled in file order up to `corpus_docs` documents.
    Test problems never appear. A pretrained base model ignores the corpus."""
    if not train:
        return {"corpus_docs": 0}
    docs = []
    for i in range(cfg.corpus_docs):
        r = train[i % len(train)]
        reasoning = (r.get("worked") or f"The answer is {r['answer']}.").strip()
        docs.append(synthetic.render_prompt(r["prompt"]) + synthetic.tagged_completion([reasoning], r["answer"]))
    table = pa.table({"text": docs, "kind": ["clean"] * len(docs)}, schema=CORPUS_SCHEMA)
    write_table(table, out / "corpus.parquet", CORPUS_SCHEMA)
    summary: dict[str, Any] = {"corpus_docs": len(docs)}
    summary.update({f"corpus_{k}": (len(docs) if k == "clean" else 0) for k in synthetic.KINDS})
    summary["corpus_mean_chars"] = round(sum(map(len, docs)) / len(docs), 1)
    summary["corpus_max_chars"] = max(map(len, docs))
    return summary


def with_prompt_turns(row: dict[str, Any], system: str | None, examples: list[FewShot]) -> dict[str, Any]:
    """`row` with `system` as its system turn (unless it has one) and `examples` as user/assistant
    turns before its question (after the system turn)."""
    messages = list(row.get("messages") or [{"role": "user", "content": row["prompt"]}])
    if messages[0]["role"] == "system":
        head, messages = messages[:1], messages[1:]
    else:
        head = [{"role": "system", "content": system}] if system else []
    turns = [{"role": role, "content": text} for ex in examples for role, text in (("user", ex.user), ("assistant", ex.assistant))]
    return {**row, "messages": head + turns + messages}


# ------------------------------------------------------------------------------------------ run


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(cfg: Config) -> str | None:
    """sha256 of the user's data (None for the synthetic source): the file's bytes for one file;
    for several, sha256 over each file's name and sha256 in path order."""
    if cfg.source != "file":
        return None
    paths = resolve_paths(cfg.path or "")
    if len(paths) == 1:
        return _file_sha256(paths[0])
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{p.name}\0{_file_sha256(p)}\n".encode())
    return digest.hexdigest()


def external_inputs(cfg: Config) -> dict[str, str]:
    """The user's data files' fingerprint: the stage has no upstream artifact, so without it the
    cache key would see only `path` and serve an edited file's old problems
    (`pipeline.runner.stage_key`)."""
    fingerprint = source_fingerprint(cfg)
    return {"problems_files": fingerprint} if fingerprint else {}


DROP_REASONS = ("dropped_empty_prompt", "dropped_empty_answer", "dropped_no_answer", "dropped_bad_messages",
                "dropped_duplicate", "skipped_invalid_utf8")


def run(cfg: Config, inputs: dict[str, Path], out: Path, ctx: StageContext) -> dict[str, Any]:
    """Build problems.parquet (and corpus.parquet for the synthetic source) in `out`.

    Returns a flat summary: row counts per split, dropped/skipped counts per reason, rows per
    source, and for the synthetic source the corpus size, noise counts and document lengths.
    """
    out = Path(out)
    seed = ctx.seed + cfg.seed_offset
    counts: Counter = Counter()
    schema = None
    if cfg.source == "synthetic":
        rows = _synthetic_problems(cfg, seed)
    else:
        rows, counts, schema = _file_problems(cfg)
    if cfg.system_prompt or cfg.few_shot:
        rows = [with_prompt_turns(r, cfg.system_prompt, cfg.few_shot) for r in rows]
    table = pa.Table.from_pylist([{k: r.get(k) for k in PROBLEMS_SCHEMA.names} for r in rows],
                                 schema=PROBLEMS_SCHEMA)
    write_table(table, out / "problems.parquet", PROBLEMS_SCHEMA)

    splits = Counter(r["split"] for r in rows)
    summary: dict[str, Any] = {
        "source": cfg.source,
        "rows": len(rows),
        "rows_train": splits.get("train", 0),
        "rows_test": splits.get("test", 0),
    }
    for reason in (*DROP_REASONS, "duplicate_conflicts", "answers_normalised"):
        summary[reason] = counts.get(reason, 0)
    if cfg.source == "file":
        summary["schema"] = schema
        summary["files"] = len(resolve_paths(cfg.path or ""))
        summary["file_sha256"] = source_fingerprint(cfg)
    if cfg.source == "synthetic":
        for src, n in sorted(Counter(r["source"] for r in rows).items()):
            summary[f"rows_task_{src.removeprefix('synthetic/')}"] = n
    dropped = sum(summary[k] for k in DROP_REASONS)
    if dropped:
        ctx.log(f"problems: dropped {dropped} rows ("
                + ", ".join(f"{k.split('_', 1)[1].replace('_', ' ')} {summary[k]}" for k in DROP_REASONS if summary[k])
                + ")")
    if cfg.source == "synthetic" and cfg.corpus_docs > 0:
        test_prompts = {r["prompt"] for r in rows if r["split"] == "test"}
        summary.update(_write_corpus(cfg, seed, test_prompts, out))
    elif cfg.source == "file" and cfg.corpus_docs > 0:
        summary.update(_write_user_corpus(cfg, [r for r in rows if r["split"] == "train"], out))
    ctx.log(f"problems: {summary['rows_train']} train, {summary['rows_test']} test"
            + (f", corpus {summary['corpus_docs']} docs" if "corpus_docs" in summary else ""))
    return summary
