"""rollout=policy_pairs: the policy's own answers, labelled in the loop, resumable."""

from __future__ import annotations

import json

import pytest

from rlfuse.plugins.tasks.sort_letters import reward

TINY = ["algo=reward_model", "rollout=policy_pairs", "rollout.prompts=12", "rollout.k=3",
        "rollout.batch_size=4", "trainer.max_steps=2", "trainer.progress=false", "++loss.bradley_terry.eval_pairs=8",
        "++loss.bradley_terry.stats_pairs=8"]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_labels_follow_the_true_reward_and_train_a_reward_model(tmp_path):
    from support import run_job

    s = run_job(TINY, tmp_path)
    rows = _rows(tmp_path / "pairs.jsonl")
    assert rows and len({r["prompt_index"] for r in rows}) <= 12
    assert all(r["chosen"] != r["rejected"] for r in rows)
    for r in rows:  # the simulated labeller (noise 0) prefers the higher true reward
        rc, rr = reward(r["prompt"], r["chosen"]), reward(r["prompt"], r["rejected"])
        assert (rc == rr) if r["label"] == "tie" else (rc > rr), r
    assert s["data/pairs"] == sum(r["label"] in ("A", "B") for r in rows)
    assert (tmp_path / "reward_model" / "config.json").exists()


def test_rerun_does_not_ask_again_and_rounds_take_fresh_prompts(tmp_path, capsys):
    from support import run_job

    run_job(TINY, tmp_path / "a")
    first = _rows(tmp_path / "a" / "pairs.jsonl")
    (tmp_path / "a" / "summary.json").unlink()
    s = run_job(TINY, tmp_path / "a")
    assert s["data/pairs_asked"] == 0 and s["data/pairs_done_before"] == len(first)
    assert _rows(tmp_path / "a" / "pairs.jsonl") == first
    run_job(TINY + ["rollout.round=2"], tmp_path / "b")
    second = _rows(tmp_path / "b" / "pairs.jsonl")
    assert not {r["prompt_index"] for r in first} & {r["prompt_index"] for r in second}


def test_a_person_who_quits_keeps_the_answers_and_resumes(tmp_path):
    from support import run_job

    answers = tmp_path / "answers.txt"
    answers.write_text("a\nb\nq\n")
    over = TINY + ["labeller=human", f"++labeller.input={answers}", "++rollout.label_batch=1"]
    with pytest.raises(Exception, match="labelling stopped after 2 answers"):
        run_job(over, tmp_path / "run")
    rows = _rows(tmp_path / "run" / "pairs.jsonl")
    assert [r["label"] for r in rows] == ["A", "B"]
    answers.write_text("t\n" * 200)
    s = run_job(over, tmp_path / "run")
    rows2 = _rows(tmp_path / "run" / "pairs.jsonl")
    assert rows2[:2] == rows and {r["label"] for r in rows2[2:]} == {"tie"}
    assert s["data/pairs"] == 2  # ties carry no preference
