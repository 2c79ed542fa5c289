"""The artifact store: every stage output is a directory of Parquet files plus `manifest.json`.

Layout under the store root (see DESIGN.md, "Artifacts"):

    <root>/artifacts/<stage>/<cache_key[:24]>/manifest.json
                                              <name>.parquet ...
                                              checkpoint/ ...      (stages that train)

- Atomic: a stage writes into `<stage>/.tmp-*`, the manifest is written last, and the directory is
  renamed into place. A crash leaves at most a `.tmp-*` directory, which readers never see and the
  next write removes.
- Cache key = hash(stage, config, the input artifacts' content hashes, code version). A stage whose
  key already has an artifact is not recomputed; that is how rerunning one stage skips upstream.
- Content hash = hash of every file's relative path and bytes (the manifest excluded). It is the
  artifact's identity for downstream cache keys and lets a reader detect a corrupted artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_KEY_CHARS = 24
_WRITER_PID = ".writer-pid"  # inside a temporary directory: who is writing it


class ArtifactError(Exception):
    """An artifact is missing, malformed, or does not match its declared schema."""


# --------------------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str], code_version: str) -> str:
    """The stage's cache key: changes when its config, an input's content or the code changes.

    Args:
        stage: stage name.
        config: the stage's validated config as plain JSON-able data.
        inputs: upstream stage name -> that artifact's content hash.
        code_version: see `code_version()`.
    """
    payload = canonical_json({"stage": stage, "config": config, "inputs": dict(inputs), "code": code_version})
    return hashlib.sha256(payload.encode()).hexdigest()


def content_hash(directory: Path) -> str:
    """sha256 over every file's relative path, size and bytes (manifest excluded), in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


_CODE_PACKAGES = ("artifacts", "lm", "rewards", "stages")


def code_version() -> str:
    """Package version + a hash of the source that produces artifacts (not the CLI or flows).

    Any edit to a stage, the engine or the rewards invalidates cached artifacts: a cache hit must
    mean "this code would produce these bytes". `R1FLOW_CODE_VERSION` overrides it (tests, and
    users who want to keep a cache across a cosmetic edit at their own risk).
    """
    override = os.environ.get("R1FLOW_CODE_VERSION")
    if override:
        return override
    return _source_hash()


_SOURCE_HASH: str | None = None


def _source_hash() -> str:
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("r1flow")
        except PackageNotFoundError:
            v = "dev"
        top = Path(__file__).resolve().parent.parent
        h = hashlib.sha256(v.encode())
        for pkg in _CODE_PACKAGES:
            for path in sorted((top / pkg).rglob("*.py")):
                h.update(path.relative_to(top).as_posix().encode())
                h.update(path.read_bytes())
        _SOURCE_HASH = f"{v}+{h.hexdigest()[:16]}"
    return _SOURCE_HASH


# -------------------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    """What `manifest.json` holds; written last, so its presence means the artifact is complete."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]  # upstream stage -> content hash
    code_version: str
    cache_key: str
    content_hash: str
    rows: dict[str, int]  # Parquet file name -> row count
    summary: dict[str, Any]
    created: str
    schema_version: int = SCHEMA_VERSION
    files: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.content_hash[:12]}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "Manifest":
        required = [f for f in cls.__dataclass_fields__ if f not in ("schema_version", "files")]
        missing = [k for k in required if k not in data]
        if missing:
            raise ArtifactError(f"{where}: manifest is missing fields {missing}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def read_manifest(directory: Path | str) -> Manifest:
    """Read and check an artifact directory's manifest. Raises ArtifactError naming the problem."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise ArtifactError(f"{directory}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an artifact (no {MANIFEST}; an interrupted write leaves none)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: manifest must be a JSON object")
    return Manifest.from_dict(data, where=str(path))


def verify(directory: Path | str) -> Manifest:
    """Read the manifest and check the files still hash to it; raise ArtifactError if not."""
    directory = Path(directory)
    m = read_manifest(directory)
    for name in m.files:
        if not (directory / name).exists():
            raise ArtifactError(f"{directory}: file {name!r} listed in the manifest is missing")
    actual = content_hash(directory)
    if actual != m.content_hash:
        raise ArtifactError(
            f"{directory}: artifact is corrupt (content hash {actual[:12]} != manifest {m.content_hash[:12]}); "
            "rerun its stage with --force"
        )
    return m


# ---------------------------------------------------------------------------------------- schema


def schema_problems(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Differences that make `actual` unusable as `expected`: missing or mistyped columns."""
    problems = []
    for f in expected:
        idx = actual.get_field_index(f.name)
        if idx < 0:
            problems.append(f"missing column {f.name!r} ({f.type})")
            continue
        got = actual.field(idx).type
        if not _compatible(got, f.type):
            problems.append(f"column {f.name!r} has type {got}, expected {f.type}")
    return problems


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if got == want:
        return True
    if pa.types.is_null(got):  # an all-null column written from an empty list
        return True
    string_like = (pa.types.is_string, pa.types.is_large_string)
    if any(t(got) for t in string_like) and any(t(want) for t in string_like):
        return True
    if pa.types.is_integer(got) and pa.types.is_integer(want):
        return True
    if pa.types.is_floating(got) and pa.types.is_floating(want):
        return True
    if pa.types.is_dictionary(got):
        return _compatible(got.value_type, want)
    if (pa.types.is_list(got) or pa.types.is_large_list(got)) and (pa.types.is_list(want) or pa.types.is_large_list(want)):
        return _compatible(got.value_type, want.value_type)
    return False


def read_table(path: Path | str, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, checking it against `schema`. Raises ArtifactError naming the problem."""
    path = Path(path)
    pf = open_parquet(path)
    if schema is not None:
        problems = schema_problems(pf.schema_arrow, schema)
        if problems:
            raise ArtifactError(f"{path}: " + "; ".join(problems))
    return pf.read(columns=columns)


def open_parquet(path: Path | str) -> pq.ParquetFile:
    """Open a Parquet file lazily (metadata only); clear errors for missing or non-Parquet files."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory, expected a Parquet file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{path}: not a Parquet file ({e})") from e


def write_table(table: pa.Table, path: Path | str, schema: pa.Schema | None = None) -> None:
    """Write a table as Parquet, cast to `schema` when given (so empty tables keep their types)."""
    if schema is not None:
        problems = schema_problems(table.schema, schema)
        if problems:
            raise ArtifactError(f"{path}: refusing to write: " + "; ".join(problems))
        table = table.select(schema.names).cast(schema)
    pq.write_table(table, path, compression="zstd")


# ----------------------------------------------------------------------------------------- store


def default_root() -> Path:
    return Path(os.environ.get("R1FLOW_ROOT", "r1flow-data"))


class ArtifactStore:
    """Content-addressed stage outputs under `<root>/artifacts`."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.artifacts = self.root / "artifacts"

    def path_for(self, stage: str, key: str) -> Path:
        return self.artifacts / stage / key[:_KEY_CHARS]

    def lookup(self, stage: str, key: str) -> Manifest | None:
        """The complete artifact for this cache key, or None. Never returns a half-written one."""
        path = self.path_for(stage, key)
        if not (path / MANIFEST).is_file():
            return None
        m = read_manifest(path)
        return m if m.cache_key == key else None

    def write(
        self,
        stage: str,
        key: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        produce: Callable[[Path], Mapping[str, Any]],
        schemas: Mapping[str, pa.Schema] | None = None,
        code: str | None = None,
    ) -> Manifest:
        """Run `produce(tmp_dir) -> summary` and publish its files atomically as an artifact.

        Every Parquet file named in `schemas` that `produce` wrote is validated; the manifest is
        written last and the directory renamed into place. On any exception the temporary
        directory is removed and nothing is published.
        """
        stage_dir = self.artifacts / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp(stage_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=stage_dir))
        marker = tmp / _WRITER_PID
        marker.write_text(str(os.getpid()))
        try:
            summary = dict(produce(tmp) or {})
            marker.unlink(missing_ok=True)
            rows = {}
            for name in sorted(p.name for p in tmp.glob("*.parquet")):
                pf = open_parquet(tmp / name)
                if schemas and name in schemas:
                    problems = schema_problems(pf.schema_arrow, schemas[name])
                    if problems:
                        raise ArtifactError(f"stage {stage} wrote {name} that breaks its schema: " + "; ".join(problems))
                rows[name] = pf.metadata.num_rows
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            manifest = Manifest(
                stage=stage,
                config=json.loads(canonical_json(config)),
                inputs=dict(inputs),
                code_version=code or code_version(),
                cache_key=key,
                content_hash=content_hash(tmp),
                rows=rows,
                summary=json.loads(canonical_json(summary)),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                files=files,
            )
            _atomic_write_text(tmp / MANIFEST, manifest.to_json())
            final = self.path_for(stage, key)
            if final.exists():  # a forced recompute replaces the old artifact
                trash = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=stage_dir))
                os.rename(final, trash / "old")
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            return manifest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @staticmethod
    def _clean_stale_tmp(stage_dir: Path) -> None:
        """Remove temporary directories left by writers that died (their pid is gone)."""
        for d in stage_dir.glob(".tmp-*"):
            marker = d / _WRITER_PID
            try:
                pid = int(marker.read_text()) if marker.exists() else None
            except ValueError:
                pid = None
            if pid is not None and _pid_alive(pid):
                continue
            if pid is None and (d.stat().st_mtime > _now() - 3600):
                continue  # young, unmarked: may belong to a live writer; leave it
            shutil.rmtree(d, ignore_errors=True)


def _now() -> float:
    import time

    return time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temporary sibling + fsync + rename, so readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


atomic_write_text = _atomic_write_text
