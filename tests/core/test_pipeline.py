"""algo=rlhf end to end (shortened): three stages in one run dir, summary, skip on re-run."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_rlhf_pipeline_writes_all_stages_and_resumes(tmp_path, capsys):
    from support import run_job

    over = ["algo=rlhf", "trainer.max_steps=2", "rollout.batch_size=8", "trainer.progress=false"]
    s = run_job(over, tmp_path)
    for stage in ("sft", "rm", "ppo"):
        assert (tmp_path / stage / "summary.json").exists()
        assert (tmp_path / stage / "final" / "config.json").exists()
    assert (tmp_path / "rm" / "reward_model" / "config.json").exists()
    ppo_cfg = (tmp_path / "ppo" / "config.yaml").read_text()
    assert f"{tmp_path}/rm/reward_model" in ppo_cfg and f"{tmp_path}/sft/final" in ppo_cfg
    for key in ("eval/reward_sft", "eval/reward_rlhf", "eval/rm_accuracy", "eval/score/model_before", "eval/score/model_after"):
        assert isinstance(s[key], float), key
    # PPO starts from the SFT policy: its "before" evaluation is the SFT policy's
    assert s["eval/reward_sft"] == pytest.approx(s["stages"]["sft"]["eval/reward_after"])
    assert json.loads((tmp_path / "summary.json").read_text())["eval/rm_accuracy"] == s["eval/rm_accuracy"]

    # an interrupted pipeline continues: drop the last stage, re-run, the others are skipped
    mtimes = {st: (tmp_path / st / "summary.json").stat().st_mtime_ns for st in ("sft", "rm")}
    (tmp_path / "ppo" / "summary.json").unlink()
    capsys.readouterr()
    s2 = run_job(over, tmp_path)
    out = capsys.readouterr().out
    assert "stage 'sft': already done" in out and "stage 'rm': already done" in out
    assert "stage 'ppo': algo=ppo" in out
    assert {st: (tmp_path / st / "summary.json").stat().st_mtime_ns for st in ("sft", "rm")} == mtimes
    assert s2["eval/rm_accuracy"] == s["eval/rm_accuracy"]
