"""The artifact store: every stage output is a directory of Parquet files plus `manifest.json`.

Layout under the store root (see DESIGN.md, "Artifacts"):

    <root>/artifacts/<stage>/<cache_key[:24]>/manifest.json
                                              <name>.parquet ...
                                              checkpoint/ ...      (stages that train)

- Atomic: a stage writes into `<stage>/.tmp-<key>-<pid>-*`, the manifest is written last, and the
  directory is renamed into place. A crash leaves at most a `.tmp-*` directory, which readers never
  see; the next write into that stage removes every one whose writer process is gone.
- Immutable: a published directory is never replaced. A forced recompute (or one replacing a corrupt
  artifact) publishes beside it as `<cache_key[:24]>.2`, `.3`, ...; `find` returns the newest. A run
  record that names a directory can therefore rely on it staying as it was.
- One writer per key: `ArtifactStore.lock(stage, key)` (an flock under `<root>/work/.locks`) makes a
  second process building the same stage key wait, then take the cache hit.
- Cache key = hash(stage, config, the input artifacts' content hashes, code version). A stage whose
  key already has an artifact is not recomputed; that is how rerunning one stage skips upstream.
- Content hash = hash of every file's relative path and sha256 (the manifest lists each file's
  sha256). It is the artifact's identity for downstream cache keys and lets a reader detect a
  corrupted artifact.
- Cheap verification: `.hashes.json` beside the manifest remembers each file's sha256 by
  (size, mtime_ns, ctime_ns, inode). `verify` re-hashes only files whose signature changed (or was
  recorded within `_RACY_NS` of their last modification), so a cached rerun costs a stat per file at
  any model size; `verify(..., full=True)` (`r1flow verify`) re-hashes every byte.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # 2: per-file sha256 in the manifest (`file_hashes`); 1 hashed one stream
MANIFEST = "manifest.json"
HASH_SIDECAR = ".hashes.json"  # per-file hash cache beside the manifest; not part of the content
_KEY_CHARS = 24
_WRITER_PID = ".writer-pid"  # legacy (before the pid was in the temp dir's name)
_TMP_PID = re.compile(r"^\.tmp-[^-]*-(\d+)-")  # .tmp-<key12>-<writer pid>-<random>
# A file modified this close to when its hash was remembered may have changed again within the
# filesystem's timestamp granularity without its signature changing ("racy git"): re-hash it.
_RACY_NS = 2_000_000_000


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_meta(rel: str) -> bool:
    """The manifest, the hash sidecar and their temporary siblings: not part of the content."""
    if "/" in rel:
        return False
    return rel == MANIFEST or rel.startswith(f".{MANIFEST}.") or HASH_SIDECAR in rel


def artifact_files(directory: Path) -> list[str]:
    """Relative paths of the files that make up an artifact's content, sorted."""
    directory = Path(directory)
    rels = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(r for r in rels if not _is_meta(r))


def hash_of_files(file_hashes: Mapping[str, str]) -> str:
    """The content hash from each file's relative path and sha256."""
    h = hashlib.sha256()
    for rel in sorted(file_hashes):
        h.update(f"{rel}\0{file_hashes[rel]}\n".encode())
    return h.hexdigest()


def content_hash(directory: Path) -> str:
    """The content hash of a directory, every byte read (see `hash_of_files`)."""
    directory = Path(directory)
    return hash_of_files({rel: file_sha256(directory / rel) for rel in artifact_files(directory)})


def _legacy_content_hash(directory: Path) -> str:
    """Schema 1: sha256 over every file's relative path, size and bytes in one stream."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(directory).as_posix()
        h.update(f"{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class HashCache:
    """`.hashes.json`: each file's sha256, remembered with the (size, mtime_ns, ctime_ns, inode) it
    had when hashed. A remembered hash is used only while the signature is unchanged and the file's
    last change is older than `_RACY_NS` before the hash was taken; otherwise the file is re-hashed.
    The sidecar is a cache: unreadable or unwritable, it is ignored (every file then gets hashed).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / HASH_SIDECAR
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError):
            pass

    def sha256(self, rel: str, full: bool = False) -> str:
        """The file's sha256: remembered when its signature allows, else read (and remembered)."""
        st = os.stat(self.directory / rel)
        sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        e = self.entries.get(rel)
        if (not full and isinstance(e, dict) and e.get("sig") == sig
                and max(st.st_mtime_ns, st.st_ctime_ns) + _RACY_NS < int(e.get("recorded_ns", 0))):
            return str(e["sha256"])
        digest = file_sha256(self.directory / rel)
        # The signature is from before the read and the time from after it (git's "racy" rule): a
        # write during the read changes the signature or lands within _RACY_NS of this time.
        self.entries[rel] = {"sig": sig, "sha256": digest, "recorded_ns": time.time_ns()}
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            _atomic_write_text(self.path, json.dumps({"files": self.entries}, sort_keys=True))
            self.dirty = False
        except OSError:
            pass  # a read-only store still verifies, by hashing


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
    file_hashes: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (schema 2)

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.content_hash[:12]}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "Manifest":
        required = [f for f in cls.__dataclass_fields__ if f not in ("schema_version", "files", "file_hashes")]
        missing = [k for k in required if k not in data]
        if missing:
            raise ArtifactError(f"{where}: manifest is missing fields {missing}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "schema_version" not in known:
            known["schema_version"] = 1
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


def verify(directory: Path | str, full: bool = False) -> Manifest:
    """Read the manifest and check the files still hash to it; raise ArtifactError naming the problem.

    Files whose (size, mtime, ctime, inode) are unchanged since their hash was remembered are not
    re-read (see `HashCache`); `full=True` re-reads every byte.
    """
    directory = Path(directory)
    m = read_manifest(directory)
    for name in m.files:
        if not (directory / name).exists():
            raise ArtifactError(f"{directory}: file {name!r} listed in the manifest is missing")
    if not m.file_hashes:  # schema 1: one stream over every byte
        actual = _legacy_content_hash(directory)
        if actual != m.content_hash:
            raise _corrupt(directory, f"content hash {actual[:12]} != manifest {m.content_hash[:12]}")
        return m
    if hash_of_files(m.file_hashes) != m.content_hash:
        raise _corrupt(directory, "the manifest's file hashes do not add up to its content hash")
    present = artifact_files(directory)
    extra = sorted(set(present) - set(m.file_hashes))
    if extra:
        raise _corrupt(directory, f"files not in the manifest: {extra[:5]}")
    cache = HashCache(directory)
    try:
        for rel, want in sorted(m.file_hashes.items()):
            if not (directory / rel).is_file():
                raise ArtifactError(f"{directory}: file {rel!r} listed in the manifest is missing")
            got = cache.sha256(rel, full=full)
            if got != want:
                raise _corrupt(directory, f"{rel} has sha256 {got[:12]}, manifest says {want[:12]}")
    finally:
        cache.save()
    return m


def _corrupt(directory: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{directory}: artifact is corrupt ({what}); rerun its stage with --force")


def enclosing_artifact(path: Path | str) -> Path | None:
    """The artifact directory holding `path` (itself or the nearest parent whose `manifest.json` is
    an r1flow manifest), or None: a file outside the store (a user's model or dataset)."""
    path = Path(path).resolve()
    for d in (path, *path.parents):
        if (d / MANIFEST).is_file():
            try:
                read_manifest(d)
            except ArtifactError:
                continue  # someone else's manifest.json
            return d
    return None



def verify_enclosing(path: Path | str) -> Path | None:
    """Verify the artifact holding `path` against its manifest and return its directory; None (nothing
    checked) for a path outside the store."""
    artifact = enclosing_artifact(path) if Path(path).exists() else None
    if artifact is not None:
        verify(artifact)
    return artifact

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


@dataclass
class Artifact:
    """A published artifact: where it is and what its manifest says."""

    path: Path
    manifest: Manifest


class ArtifactStore:
    """Content-addressed stage outputs under `<root>/artifacts`."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.artifacts = self.root / "artifacts"

    def path_for(self, stage: str, key: str) -> Path:
        """Where the first artifact of this key is published (later ones get `.2`, `.3`, ...)."""
        return self.artifacts / stage / key[:_KEY_CHARS]

    def candidates(self, stage: str, key: str) -> list[Path]:
        """Every published directory of this key, oldest first."""
        first = self.path_for(stage, key)
        later = []
        for d in first.parent.glob(f"{first.name}.*"):
            suffix = d.name[len(first.name) + 1:]
            if suffix.isdigit():
                later.append((int(suffix), d))
        return [first, *(d for _, d in sorted(later))]

    def find(self, stage: str, key: str) -> Artifact | None:
        """The newest complete artifact of this cache key, or None. Never a half-written one."""
        for path in reversed(self.candidates(stage, key)):
            if (path / MANIFEST).is_file():
                m = read_manifest(path)
                if m.cache_key == key:
                    return Artifact(path, m)
        return None

    def lookup(self, stage: str, key: str) -> Manifest | None:
        """The manifest of `find(stage, key)`, or None."""
        found = self.find(stage, key)
        return found.manifest if found is not None else None

    @contextmanager
    def lock(self, stage: str, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the one-writer lock of a stage key (waits while another process holds it).

        An flock: the kernel releases it when its holder dies, so a killed run never blocks the
        next one. On a shared filesystem it is only as good as that filesystem's flock.
        """
        path = self.root / "work" / ".locks" / f"{stage}-{key[:_KEY_CHARS]}.lock"
        with hold_flock(path, what=f"stage {stage} (key {key[:12]})", on_wait=on_wait):
            yield

    def write(self, *args: Any, **kwargs: Any) -> Manifest:
        """`publish`, returning the manifest only."""
        return self.publish(*args, **kwargs).manifest

    def publish(
        self,
        stage: str,
        key: str,
        config: Mapping[str, Any],
        inputs: Mapping[str, str],
        produce: Callable[[Path], Mapping[str, Any]],
        schemas: Mapping[str, pa.Schema] | None = None,
        code: str | None = None,
    ) -> Artifact:
        """Run `produce(tmp_dir) -> summary` and publish its files atomically as an artifact.

        Every Parquet file named in `schemas` that `produce` wrote is validated; each file's sha256
        goes into the manifest (and the hash sidecar), the manifest is written last and the
        directory renamed into place: at `path_for(stage, key)`, or beside an existing artifact of
        the key (never over it). On any exception the temporary directory is removed and nothing is
        published.
        """
        stage_dir = self.artifacts / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        self._clean_stale_tmp(stage_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-{os.getpid()}-", dir=stage_dir))
        try:
            summary = dict(produce(tmp) or {})
            rows = {}
            for name in sorted(p.name for p in tmp.glob("*.parquet")):
                pf = open_parquet(tmp / name)
                if schemas and name in schemas:
                    problems = schema_problems(pf.schema_arrow, schemas[name])
                    if problems:
                        raise ArtifactError(f"stage {stage} wrote {name} that breaks its schema: " + "; ".join(problems))
                rows[name] = pf.metadata.num_rows
            files = artifact_files(tmp)
            hashes = HashCache(tmp)
            file_hashes = {rel: hashes.sha256(rel, full=True) for rel in files}
            manifest = Manifest(
                stage=stage,
                config=json.loads(canonical_json(config)),
                inputs=dict(inputs),
                code_version=code or code_version(),
                cache_key=key,
                content_hash=hash_of_files(file_hashes),
                rows=rows,
                summary=json.loads(canonical_json(summary)),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                files=files,
                file_hashes=file_hashes,
            )
            hashes.save()
            _atomic_write_text(tmp / MANIFEST, manifest.to_json())
            return Artifact(self._rename_into_place(tmp, stage, key), manifest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _rename_into_place(self, tmp: Path, stage: str, key: str) -> Path:
        """Rename `tmp` to the first free published path of the key; never over an existing one."""
        first = self.path_for(stage, key)
        taken = {p.name for p in self.candidates(stage, key) if p.exists()}
        for n in itertools.count(1):
            final = first if n == 1 else first.with_name(f"{first.name}.{n}")
            if final.name in taken or final.exists():
                continue
            try:
                os.rename(tmp, final)
            except OSError as e:  # raced with another publisher (not holding the key's lock)
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
            return final
        raise AssertionError("unreachable")

    @staticmethod
    def _clean_stale_tmp(stage_dir: Path) -> None:
        """Remove temporary directories left by writers that died (their pid is gone)."""
        for d in stage_dir.glob(".tmp-*"):
            m = _TMP_PID.match(d.name)
            if m is not None:
                pid = int(m.group(1))
            else:  # written before the pid was in the name: a marker file, if any
                marker = d / _WRITER_PID
                try:
                    pid = int(marker.read_text()) if marker.exists() else None
                except (ValueError, OSError):
                    pid = None
            if pid is not None and _pid_alive(pid):
                continue
            try:
                if pid is None and (d.stat().st_mtime > _now() - 3600):
                    continue  # legacy, unmarked, young: may belong to a live writer; leave it
            except FileNotFoundError:
                continue
            shutil.rmtree(d, ignore_errors=True)


@contextmanager
def hold_flock(path: Path, what: str, on_wait: Callable[[str], None] | None = None,
               wait: bool = True) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed), writing our pid into it.

    Blocks while another process holds it (telling `on_wait` whom it waits for), or with
    `wait=False` raises ArtifactError naming the holder. The kernel drops the lock when the holder
    process dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(path)
            if not wait:
                raise ArtifactError(f"{what} is in use by another r1flow process ({holder}); wait for it to finish")
            if on_wait is not None:
                on_wait(f"{what}: waiting for another r1flow process ({holder}) to finish it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "pid unknown"
    except OSError:
        return "pid unknown"


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
