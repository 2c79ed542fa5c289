"""Artifacts: stage outputs as Parquet + manifest directories, and run records."""
from artifacts.runs import RunRecord, RunStore, StageEntry, new_run_id
from artifacts.store import (
    MANIFEST,
    Artifact,
    ArtifactError,
    ArtifactStore,
    Manifest,
    cache_key,
    code_version,
    content_hash,
    default_root,
    enclosing_artifact,
    open_parquet,
    read_manifest,
    read_table,
    schema_problems,
    verify,
    verify_enclosing,
    write_table,
)

__all__ = [
    "MANIFEST", "Artifact", "ArtifactError", "ArtifactStore", "Manifest", "RunRecord", "RunStore", "StageEntry",
    "cache_key", "code_version", "content_hash", "default_root", "enclosing_artifact", "new_run_id", "open_parquet",
    "read_manifest", "read_table", "schema_problems", "verify", "verify_enclosing", "write_table",
]
