"""The third-party plugin package in docs/examples installs and is selected by name."""

from __future__ import annotations

import json

import pytest

from support import FAST, run_job


@pytest.mark.slow
def test_example_plugin_installs_and_runs(with_example, tmp_path):
    from rlfuse.manager import available_plugins

    assert available_plugins()["brevity"] == "rlfuse_brevity"
    # every character costs 1 (max_chars=0): the plugin's own options reach it, its weight
    # reaches the core's weighted sum
    run_job(FAST + ["+reward.brevity.plugin=brevity", "+reward.brevity.weight=0.1", "+reward.brevity.max_chars=0",
                    "+reward.brevity.penalty_per_char=1.0"], tmp_path / "run")  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/brevity/mean" in r]
    assert len(steps) == 2
    for r in steps:
        # the total is the weighted sum of the components (rule and kl_penalty weigh 1)
        total = r["reward/rule/mean"] + r["reward/kl_penalty/mean"] + 0.1 * r["reward/brevity/mean"]
        assert r["reward/mean"] == pytest.approx(total, rel=1e-5, abs=1e-6)
        # 1 - score = mean characters per answer; answers of the untrained model are mostly
        # printable characters (tokens incl. EOS: response/length_mean). With the default
        # max_chars=8 the score would stay near 1.
        chars = 1.0 - r["reward/brevity/mean"]
        assert 0.5 * r["response/length_mean"] <= chars <= r["response/length_mean"], r
