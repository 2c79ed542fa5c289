"""Shared fixtures. Prefect's ephemeral test server takes ~10 s to start: one per session."""
from __future__ import annotations

import os
import shutil

import pytest

# Same config + seed -> same artifacts, even if the source tree is edited mid-session.
os.environ.setdefault("R1FLOW_CODE_VERSION", "tests")


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def micro_run(prefect_harness, tmp_path_factory):
    """The full flow on the `micro` preset, run once per session: (root, run_id, run --json)."""
    import json

    from tests.pipeline.cli_helpers import cli

    root = tmp_path_factory.mktemp("micro-root")
    # TensorBoard on: trackers are not part of any cache key (test_second_identical_run... checks).
    code, out = cli("run", "--preset", "micro", "--root", str(root), "--run-id", "micro-1", "--json",
                    "--set", 'run.trackers=["tensorboard"]')
    assert code == 0
    summary = json.loads(out)  # --json: stdout is exactly one JSON document (the table goes to stderr)
    return root, "micro-1", summary


@pytest.fixture
def micro_copy(micro_run, tmp_path):
    """A private copy of the micro run's root, for tests that change or break it."""
    root, run_id, _ = micro_run
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    # run records hold artifact paths relative to the root: a copied root needs no rewriting
    return copy, run_id
