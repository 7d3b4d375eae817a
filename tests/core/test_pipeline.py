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


@pytest.mark.slow
def test_two_round_iterative_rlhf_end_to_end(tmp_path):
    """algo.rounds=2: sft, then (label -> rm -> ppo) twice; round 2 labels the round-1 policy,
    continues its training and keeps the SFT policy as the KL reference."""
    from support import run_job

    over = ["algo=rlhf", "algo.rounds=2", "trainer.max_steps=2", "rollout.batch_size=8", "rollout.prompts=8",
            "rollout.k=3", "rollout.data_pairs=16", "trainer.progress=false", "eval.task.num_prompts=8"]
    s = run_job(over, tmp_path)
    assert list(s["stages"]) == ["sft", "rm", "ppo", "rm_r2", "ppo_r2"]
    rm2 = (tmp_path / "rm_r2" / "config.yaml").read_text()
    ppo2 = (tmp_path / "ppo_r2" / "config.yaml").read_text()
    assert f"policy: {tmp_path}/ppo/final" in rm2 and "round: 2" in rm2       # samples the round-1 policy
    assert f"name_or_path: {tmp_path}/sft/final" in rm2                       # the RM starts from SFT
    assert f"name_or_path: {tmp_path}/ppo/final" in ppo2                      # PPO continues round 1
    assert f"ref_name_or_path: {tmp_path}/sft/final" in ppo2                  # KL to SFT
    assert f"path: {tmp_path}/rm_r2/reward_model" in ppo2                     # the refreshed RM
    r1 = [json.loads(x)["prompt_index"] for x in (tmp_path / "rm" / "pairs.jsonl").read_text().splitlines()]
    r2 = [json.loads(x)["prompt_index"] for x in (tmp_path / "rm_r2" / "pairs.jsonl").read_text().splitlines()]
    assert r1 and r2 and not set(r1) & set(r2)                                # fresh prompts
    assert s["eval/reward_rlhf"] == s["stages"]["ppo_r2"]["eval/reward_after"]
    assert s["eval/reward_sft"] == s["stages"]["ppo"]["eval/reward_before"]
    assert (tmp_path / "final").resolve() == (tmp_path / "ppo_r2" / "final").resolve()


@pytest.mark.slow
def test_online_dpo_two_rounds_on_the_policys_own_pairs(tmp_path):
    """algo=online_dpo: SFT, then DPO on labelled pairs of the current policy's samples, twice;
    round 2 starts from round 1's policy, on fresh prompts, reference = SFT."""
    import json

    from support import run_job

    s = run_job(["algo=online_dpo", "trainer.max_steps=2", "rollout.batch_size=4", "rollout.prompts=8", "rollout.k=3", "rollout.data_pairs=16",
                 "trainer.progress=false", "eval.task.num_prompts=8"], tmp_path)
    assert list(s["stages"]) == ["sft", "dpo", "dpo_r2"]
    cfg2 = (tmp_path / "dpo_r2" / "config.yaml").read_text()
    assert f"name_or_path: {tmp_path}/dpo/final" in cfg2 and f"ref_name_or_path: {tmp_path}/sft/final" in cfg2
    p1 = {json.loads(x)["prompt_index"] for x in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()}
    p2 = {json.loads(x)["prompt_index"] for x in (tmp_path / "dpo_r2" / "pairs.jsonl").read_text().splitlines()}
    assert p1 and p2 and not p1 & p2
    assert s["eval/reward_after"] == s["stages"]["dpo_r2"]["eval/reward_after"]
