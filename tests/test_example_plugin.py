"""The third-party plugin package in docs/examples installs and is selected by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import FAST, run_job

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "rlfuse-brevity"


@pytest.mark.slow
def test_example_plugin_installs_and_runs(tmp_path, monkeypatch):
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(EXAMPLE)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    monkeypatch.syspath_prepend(str(site))
    from rlfuse.manager import available_plugins

    assert available_plugins()["brevity"] == "rlfuse_brevity"
    run_job(FAST + ["+reward.brevity.plugin=brevity", "+reward.brevity.weight=0.1", "+reward.brevity.max_chars=3"], tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["reward/brevity/mean"] for r in rows if "reward/brevity/mean" in r]
    assert len(scores) == 2 and all(s <= 1.0 for s in scores)
