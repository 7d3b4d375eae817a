"""One 3-rank launch (gloo, 127.0.0.1) shared by the sync-plugin tests."""

from __future__ import annotations

import pytest
from distributed_support import launch, logs, results, wait


@pytest.fixture(scope="session")
def sync_checks(tmp_path_factory):
    """Each rank's results of distributed_support._sync_checks: every sync plugin applied to
    a small model that each rank perturbed differently, the metric reduction, a two-phase
    update that fails on rank 1."""
    out = tmp_path_factory.mktemp("sync_checks")
    codes = wait(launch("sync_checks", 3, {}, out), timeout=180)
    assert codes == [0, 0, 0], logs(out, 3)
    return results(out, 3)
