"""`r1flow inspect`: look at any dataset without loading it all.

Schema, row count and per-column statistics come from the Parquet footer (no data read); the first
rows come from the first record batch; `--where` streams the file with a pushed-down filter and
stops once it has enough rows. A million-row file opens in well under a second
(bench/inspect_dataset.py measures it).

A dataset inside the artifact store is verified against its manifest's hashes first (a stat per
file while unchanged, see `artifacts.store.HashCache`): a corrupted artifact is an error. A file
outside the store has no hashes to check; the output says so (`verified: false`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from artifacts import ArtifactError, RunStore, open_parquet, read_manifest, verify, verify_enclosing
from artifacts.store import default_root

_WHERE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(==|!=|>=|<=|>|<|=|~)\s*(.*?)\s*$")


@dataclass
class Target:
    parquet: Path
    manifest: dict[str, Any] | None
    others: list[str]  # other Parquet files in the same artifact
    verified: bool = False  # checked against an artifact manifest's hashes


def resolve(target: str, root: Path | None = None, name: str | None = None) -> Target:
    """Resolve a file, an artifact directory, or RUN_ID/STAGE[/FILE] to one Parquet file; a stage
    that is still running resolves to the metrics it has flushed so far."""
    root = Path(root) if root is not None else default_root()
    path = Path(target)
    if not path.exists():
        parts = target.strip("/").split("/")
        if len(parts) in (2, 3) and RunStore(root).exists(parts[0]):
            record = RunStore(root).load(parts[0])
            entry = record.stages.get(parts[1])
            if entry is None:
                raise ArtifactError(f"run {parts[0]} has no stage {parts[1]!r}; it has: {', '.join(record.stages)}")
            if len(parts) == 3:
                name = parts[2]
            if not entry.path:
                live = _live_metrics(entry, name)
                if live is not None:
                    return Target(parquet=live, manifest=None, others=[])
                raise ArtifactError(f"run {parts[0]}: stage {parts[1]} has no artifact yet (status {entry.status})")
            path = Path(entry.path)
        else:
            raise ArtifactError(f"{target}: no such file, artifact directory or RUN_ID/STAGE under {root}")
    if path.is_file():
        artifact = verify_enclosing(path)
        return Target(parquet=path, manifest=None, others=[], verified=artifact is not None)
    manifest = verify(path)
    files = sorted(manifest.rows)
    if not files:
        raise ArtifactError(f"{path}: artifact of stage {manifest.stage} holds no Parquet files")
    if name is not None:
        fname = name if name.endswith(".parquet") else f"{name}.parquet"
        if fname not in files:
            raise ArtifactError(f"{path}: no dataset {name!r}; it has: {', '.join(files)}")
    else:
        fname = main_dataset(manifest.stage, files)
    from dataclasses import asdict

    return Target(parquet=path / fname, manifest=asdict(manifest), others=[f for f in files if f != fname],
                  verified=True)


def main_dataset(stage: str, files: list[str]) -> str:
    """The dataset `inspect RUN/STAGE` opens: the first of the stage's SCHEMAS (its main output:
    cold_start.parquet, evaluate's summary) that the artifact holds; else the first file."""
    from pipeline.config import STAGES, stage_module

    if stage in STAGES:
        for name in stage_module(stage).SCHEMAS:
            if name in files:
                return name
    return files[0]


def parse_where(expr: str) -> ds.Expression:
    """`col op value` with op in == != > >= < <= ~ (substring); value is a number or a string."""
    m = _WHERE.match(expr)
    if not m:
        raise ArtifactError(f"--where {expr!r}: expected 'column op value', op one of == != > >= < <= ~")
    col, op, raw = m.groups()
    if raw[:1] in ("=", "<", ">", "!", "~"):  # "reward=>1", "x==>2": two operators
        raise ArtifactError(f"--where {expr!r}: cannot parse {op + raw!r} as an operator and a value; "
                            "operators are == != > >= < <= ~")
    value: Any = raw.strip("'\"")
    if raw == value:  # unquoted: try a number / bool
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                continue
        if raw in ("true", "false"):
            value = raw == "true"
    field = ds.field(col)
    if op == "~":
        return pc.match_substring(field, str(value))
    return {
        "==": field == value, "=": field == value, "!=": field != value,
        ">": field > value, ">=": field >= value, "<": field < value, "<=": field <= value,
    }[op]


def _check_types(expr: str, schema: pa.Schema) -> None:
    """A value that cannot compare with its column is an error naming the expression."""
    col, op, raw = _WHERE.match(expr).groups()
    typ = schema.field(col).type
    if op == "~":
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise ArtifactError(f"--where {expr!r}: ~ (substring) needs a string column; {col} is {typ}")
        return
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        try:
            float(raw)
        except ValueError:
            raise ArtifactError(f"--where {expr!r}: {col} is {typ}, but {raw!r} is not a number") from None


def _column_stats(pf) -> dict[str, dict[str, Any]]:
    md = pf.metadata
    stats: dict[str, dict[str, Any]] = {}
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    for ci, name in enumerate(names):
        nulls, lo, hi, known = 0, None, None, True
        for rg in range(md.num_row_groups):
            s = md.row_group(rg).column(ci).statistics
            if s is None:
                known = False
                break
            nulls += s.null_count if s.has_null_count else 0
            if s.has_min_max:
                try:
                    lo = s.min if lo is None else min(lo, s.min)
                    hi = s.max if hi is None else max(hi, s.max)
                except TypeError:
                    pass
        stats[name] = {"nulls": nulls if known else None, "min": lo if known else None, "max": hi if known else None}
    return stats


def inspect_dataset(target: Target, rows: int = 5, columns: list[str] | None = None,
                    where: list[str] | None = None) -> dict[str, Any]:
    if rows < 0:
        raise ArtifactError(f"--rows {rows}: expected 0 or more rows")
    pf = open_parquet(target.parquet)
    schema = pf.schema_arrow
    if columns:
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            raise ArtifactError(f"{target.parquet}: no column(s) {missing}; columns are: {', '.join(schema.names)}")
    out: dict[str, Any] = {
        "path": str(target.parquet),
        "rows": pf.metadata.num_rows,
        "row_groups": pf.metadata.num_row_groups,
        "schema": {f.name: str(f.type) for f in schema},
        "stats": _column_stats(pf),
        "verified": target.verified,
    }
    if target.manifest is not None:
        m = target.manifest
        out["artifact"] = {k: m[k] for k in ("stage", "content_hash", "created", "summary", "rows")}
        out["artifact"]["other_datasets"] = target.others
    if where:
        for w in where:
            col = _WHERE.match(w).group(1) if _WHERE.match(w) else None
            if col is not None and schema.get_field_index(col) < 0:
                raise ArtifactError(f"--where {w!r}: no column {col!r}; columns are: {', '.join(schema.names)}")
        expr = parse_where(where[0])
        for w in where[1:]:
            expr = expr & parse_where(w)
        for w in where:
            _check_types(w, schema)
        dataset = ds.dataset(target.parquet, format="parquet")
        try:
            head = dataset.head(rows, columns=columns, filter=expr)
            out["matched"] = dataset.count_rows(filter=expr)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as e:
            raise ArtifactError(f"--where {where}: cannot apply to these columns ({e})") from e
    elif rows > 0 and pf.metadata.num_rows > 0:
        batch = next(pf.iter_batches(batch_size=rows, columns=columns))
        head = pa.Table.from_batches([batch])
    else:
        head = schema.empty_table().select(columns) if columns else schema.empty_table()
    out["head"] = head.slice(0, rows).to_pylist()
    return out


def _cell(v: Any, width: int = 40) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)
    s = s.replace("\n", "⏎")
    return s if width <= 0 or len(s) <= width else s[: width - 1] + "…"


def _summary_table(summary: dict[str, Any], width: int) -> list[str] | None:
    """The table-valued entries of a summary (evaluate: checkpoint -> metric -> value) as rows ×
    columns; None when it has none."""
    summary = {k: v for k, v in summary.items() if isinstance(v, dict)}
    if not summary:
        return None
    cols = list(dict.fromkeys(k for v in summary.values() for k in v))
    cells = [[str(name)] + [_cell(v.get(c), width) if not isinstance(v.get(c), float) else f"{v[c]:.3g}"
                            for c in cols] for name, v in summary.items()]
    header = [""] + cols
    widths = [max(len(header[i]), *(len(r[i]) for r in cells)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(header))]
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(len(header))) for r in cells]
    return lines


def render(info: dict[str, Any], width: int = 40) -> str:
    """Human-readable text for `r1flow inspect`; cells cut at `width` characters (0: whole)."""
    lines = [f"{info['path']}", f"rows: {info['rows']:,}   row groups: {info['row_groups']}"]
    lines.append("content: verified against its artifact manifest (sha256)" if info.get("verified")
                 else "content: not verified (a file outside the artifact store has no manifest)")
    if "artifact" in info:
        a = info["artifact"]
        lines.append(f"artifact: stage {a['stage']}  id {a['stage']}-{a['content_hash'][:12]}  created {a['created']}")
        if a["other_datasets"]:
            lines.append(f"other datasets: {', '.join(a['other_datasets'])}")
        flat = {k: v for k, v in a["summary"].items() if not isinstance(v, dict)}
        if flat:
            lines.append("summary: " + ", ".join(f"{k}={_cell(v, 24)}" for k, v in flat.items()))
        table = _summary_table(a["summary"], 24)
        if table:
            lines += ["", *table]
    lines.append("")
    w = max([len(n) for n in info["schema"]] + [6])
    lines.append(f"{'column':<{w}}  {'type':<14} {'nulls':>7}  {'min':<20} {'max':<20}")
    for name, typ in info["schema"].items():
        s = info["stats"].get(name, {})
        nulls = "?" if s.get("nulls") is None else str(s["nulls"])
        lines.append(f"{name:<{w}}  {typ:<14} {nulls:>7}  {_cell(s.get('min'), 20):<20} {_cell(s.get('max'), 20):<20}")
    lines.append("")
    if "matched" in info:
        lines.append(f"matching rows: {info['matched']:,}")
    head = info["head"]
    if head:
        cols = list(head[0].keys())
        cells = [[_cell(r[c], width) for c in cols] for r in head]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(cols)))
        lines.append("  ".join("-" * widths[i] for i in range(len(cols))))
        lines.extend("  ".join(row[i].ljust(widths[i]) for i in range(len(cols))) for row in cells)
    else:
        lines.append("(no rows)")
    return "\n".join(lines)


def _live_metrics(entry: Any, name: str | None) -> Path | None:
    """The metrics.parquet a running stage flushes into its scratch directory (rows so far)."""
    if entry.status != "running" or not entry.work or name not in (None, "metrics", "metrics.parquet"):
        return None
    from stages.context import LIVE_METRICS

    live = Path(entry.work) / LIVE_METRICS
    return live if live.is_file() else None
