"""``logger=jsonl``: one JSON object per logged step in ``<run_dir>/metrics.jsonl``; a resumed
run appends instead of truncating."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rlfuse.manager import instantiate, resolve


def ctx(tmp_path, resume=False):
    return SimpleNamespace(cfg=SimpleNamespace(trainer=SimpleNamespace(resume=resume)), run_dir=tmp_path)


def lines(tmp_path):
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_one_line_per_log_call_with_the_step(tmp_path):
    p = instantiate(resolve("jsonl"), {}, name="jsonl", where="logger.jsonl")
    p.setup(ctx=ctx(tmp_path))
    p.log(step=1, metrics={"reward/mean": 0.25, "loss/total": 1.5})
    assert lines(tmp_path) == [{"step": 1, "reward/mean": 0.25, "loss/total": 1.5}]  # flushed at once
    p.log(step=2, metrics={"eval/reward": 0.75})
    p.teardown()
    assert lines(tmp_path) == [{"step": 1, "reward/mean": 0.25, "loss/total": 1.5}, {"step": 2, "eval/reward": 0.75}]


def test_resume_appends_a_fresh_run_truncates(tmp_path):
    p = instantiate(resolve("jsonl"), {}, name="jsonl", where="logger.jsonl")
    p.setup(ctx=ctx(tmp_path))
    p.log(step=1, metrics={"reward/mean": 0.0})
    p.teardown()
    resumed = instantiate(resolve("jsonl"), {}, name="jsonl", where="logger.jsonl")
    resumed.setup(ctx=ctx(tmp_path, resume=True))
    resumed.log(step=2, metrics={"reward/mean": 1.0})
    resumed.teardown()
    assert [r["step"] for r in lines(tmp_path)] == [1, 2]
    fresh = instantiate(resolve("jsonl"), {}, name="jsonl", where="logger.jsonl")
    fresh.setup(ctx=ctx(tmp_path))
    fresh.log(step=1, metrics={"reward/mean": 2.0})
    fresh.teardown()
    assert lines(tmp_path) == [{"step": 1, "reward/mean": 2.0}]
