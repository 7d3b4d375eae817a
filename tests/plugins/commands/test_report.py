"""rlfuse report: the per-seed and mean ± std figures equal the runs' own summaries."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml

from rlfuse.plugins.commands.report import collect, main


def _fake_run(d, seed, summary):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "algo": {"name": summary["algo"]}}))
    (d / "summary.json").write_text(json.dumps(summary))


def test_report_numbers_equal_the_summaries(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    rows = {0: (0.71, 0.78, 0.30, 0.52), 1: (0.83, 0.88, 0.77, 0.90), 2: (0.73, 0.80, 0.37, 0.41)}
    for seed, (b, a, sb, sa) in rows.items():
        _fake_run(sweep / str(seed), seed, {"algo": "rlhf", "eval/reward_sft": b, "eval/reward_rlhf": a,
                                            "eval/score/model_before": sb, "eval/score/model_after": sa,
                                            "eval/rm_accuracy": 0.8, "stages": {}})
    single = tmp_path / "single"
    _fake_run(single, 7, {"algo": "ppo", "eval/reward_before": 0.5, "eval/reward_after": 0.6,
                          "eval/exact_before": 0.1, "eval/exact_after": 0.2})
    rep = collect([str(sweep)])
    true = rep["figures"]["eval/reward"]
    assert [(r["seed"], r["before"], r["after"]) for r in true["runs"]] == [(s, v[0], v[1]) for s, v in rows.items()]
    gains = [v[1] - v[0] for v in rows.values()]
    assert true["gain"][0] == pytest.approx(statistics.mean(gains))
    assert true["gain"][1] == pytest.approx(statistics.stdev(gains))
    assert true["after"][0] == pytest.approx(statistics.mean(v[1] for v in rows.values()))
    assert true["raised"] == 3 and true["n"] == 3
    score = rep["figures"]["eval/score/model"]
    assert [r["after"] for r in score["runs"]] == [v[3] for v in rows.values()]
    # a plain run dir works too, and before/after pairs of any eval/ figure are found
    # a warm-up pipeline's own config.yaml has no seed: it is read from a stage's
    (single / "config.yaml").write_text(yaml.safe_dump({"algo": {"name": "ppo", "stages": {}}}))
    (single / "ppo").mkdir()
    (single / "ppo" / "config.yaml").write_text(yaml.safe_dump({"seed": 7}))
    rep2 = collect([str(single)])
    assert rep2["figures"]["eval/reward"]["runs"][0]["after"] == 0.6
    assert rep2["figures"]["eval/exact"]["runs"][0]["seed"] == 7
    # the command prints the tables with machine and date, and writes JSON
    out_json = tmp_path / "rep.json"
    assert main([str(sweep), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "machine:" in text and "| 1 | 0.830 | 0.880 | +0.050 |" in text and "raised on 3 of 3" in text
    assert json.loads(out_json.read_text())["figures"]["eval/reward"]["n"] == 3


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such run dir"):
        collect([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no summary.json"):
        collect([str(tmp_path)])
