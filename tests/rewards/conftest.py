"""Shared fixtures for the rewards tests: one comparison pool with a short timeout."""
from __future__ import annotations

import pytest

from rewards import accuracy

TEST_TIMEOUT_S = 1.0


@pytest.fixture(scope="session", autouse=True)
def fast_pool():
    """All accuracy tests share a 2-worker pool whose comparisons time out after 1 s."""
    pool = accuracy.configure(workers=2, timeout_s=TEST_TIMEOUT_S)
    yield pool
    pool.close()
