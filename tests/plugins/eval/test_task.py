"""``eval=task``: held-out prompts answered by the policy and scored with the task's true
reward function; learned reward components score the same answers (``scorers``)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from rlfuse import hookimpl, models
from rlfuse.config import ModelConfig
from rlfuse.manager import PluginError, PluginManager, instantiate, resolve
from rlfuse.trainer import Context

PROBE = """
calls = []

def reward(prompt, response, **columns):
    calls.append((prompt, response, columns.get("target")))
    return 1.0 if len(response) % 2 == 0 else 0.25
"""


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    (tmp_path / "task_probe.py").write_text(PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("task_probe", None)
    tok = models.build_tiny_tokenizer()
    data = SimpleNamespace(eval_prompts="pkg://rlfuse.plugins/tasks/data/prompts_eval.jsonl",
                           reward_fn="task_probe:reward", max_prompt_length=16, truncation="left")  # fmt: skip
    ns = SimpleNamespace(cfg=SimpleNamespace(data=data), tokenizer=tok, device=torch.device("cpu"), run_dir=tmp_path,
                         policy=models.build_tiny_model(ModelConfig(), tok, 0), pm=PluginManager())  # fmt: skip
    ns.score = lambda batch, names: Context.score(ns, batch, names)  # the core's service, on this stand-in
    return ns


def task(**options):
    return instantiate(resolve("task"), options, name="task", where="eval.task")


class Length:
    """A stand-in learned reward: the response length."""

    @hookimpl
    def reward(self, batch):
        return {"length": torch.tensor([float(len(r)) for r in batch.responses])}


def test_true_reward_of_greedy_answers(ctx):
    p = task(num_prompts=5, batch_size=2, max_new_tokens=6, samples=2, scorers=["length"])
    ctx.pm.register_plugin(Length(), "reward.length")
    p.setup(ctx=ctx)
    out = p.evaluate(ctx=ctx, step=7)
    calls = sys.modules["task_probe"].calls
    assert len(calls) == 5  # num_prompts, in chunks of batch_size
    assert all(t is not None for _, _, t in calls)  # the row's `target` column reaches the function
    scores = [1.0 if len(r) % 2 == 0 else 0.25 for _, r, _ in calls]
    assert out["eval/reward"] == pytest.approx(sum(scores) / 5)
    assert out["eval/exact"] == pytest.approx(sum(s == 1.0 for s in scores) / 5)
    assert out["eval/score/length"] == pytest.approx(sum(len(r) for _, r, _ in calls) / 5)
    samples = [json.loads(x) for x in (ctx.run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"], s["response"]) for s in samples] == [(7, p_, r) for p_, r, _ in calls[:2]]
    # greedy decoding: the same policy gives the same answers
    p.evaluate(ctx=ctx, step=8)
    assert calls[5:] == calls[:5]


def test_unknown_scorer_is_an_error_naming_it(ctx):
    p = task(num_prompts=2, max_new_tokens=2, scorers=["model"])
    p.setup(ctx=ctx)
    with pytest.raises(ValueError, match="eval.task.scorers names 'model'"):
        p.evaluate(ctx=ctx, step=0)


def test_skips_itself_without_eval_prompts_or_reward_fn(ctx, capsys):
    """Your own preference data has no task: the default `eval: [task]` must not block the run
    (README: `rlfuse algo=dpo model=hf ... data=jsonl data.preferences=...` as written)."""
    ctx.cfg.data.reward_fn = None
    plugin = task()
    plugin.setup(ctx=ctx)
    assert "eval.task skipped: data.reward_fn not set" in capsys.readouterr().err
    assert plugin.evaluate(ctx=ctx, step=0) == {}
    ctx.cfg.data.eval_prompts = None
    task().setup(ctx=ctx)
    assert "data.eval_prompts and data.reward_fn not set" in capsys.readouterr().err
    with pytest.raises(PluginError, match="eval.task.num_prompts"):
        task(num_prompts="many")
